// The demo page: a drawing pad, a log-scale tolerance slider, and the model's live answer.
(() => {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const tol = document.getElementById("tol");
  const tolValue = document.getElementById("tol-value");
  const modelSelect = document.getElementById("model");
  const bars = document.getElementById("bars");
  const error = document.getElementById("error");
  let drawing = false;
  let dirty = false;
  let pending = null;
  const labelsByModel = {};

  function clearPad() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
    for (const id of ["label", "iterations", "residual", "bound", "converged", "latency"]) {
      document.getElementById(id).textContent = "-";
    }
    bars.replaceChildren();
  }

  function point(event) {
    const r = pad.getBoundingClientRect();
    return [(event.clientX - r.left) * pad.width / r.width, (event.clientY - r.top) * pad.height / r.height];
  }

  pad.addEventListener("pointerdown", (e) => {
    drawing = true;
    pad.setPointerCapture(e.pointerId);
    ctx.strokeStyle = "#fff";
    ctx.lineWidth = 22;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...point(e));
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    ctx.lineTo(...point(e));
    ctx.stroke();
    dirty = true;
  });
  for (const type of ["pointerup", "pointercancel", "pointerleave"]) {
    pad.addEventListener(type, () => {
      if (drawing && dirty) classify();
      drawing = false;
    });
  }

  // Drop an image: draw it onto the pad, scaled to fit.
  pad.addEventListener("dragover", (e) => e.preventDefault());
  pad.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (!file) return;
    const img = new Image();
    img.onload = () => {
      clearPad();
      ctx.drawImage(img, 0, 0, pad.width, pad.height);
      dirty = true;
      classify();
    };
    img.src = URL.createObjectURL(file);
  });

  function currentTol() {
    return Math.pow(10, Number(tol.value));
  }

  tol.addEventListener("input", () => {
    tolValue.textContent = `1e${tol.value}`;
    if (dirty) classify();
  });
  document.getElementById("clear").addEventListener("click", clearPad);
  modelSelect.addEventListener("change", () => dirty && classify());

  function render(data) {
    const p = data.predictions[0];
    document.getElementById("label").textContent = p.label;
    document.getElementById("iterations").textContent = p.iterations;
    document.getElementById("residual").textContent = p.residual.toExponential(2);
    document.getElementById("bound").textContent = p.error_bound.toExponential(2);
    document.getElementById("converged").textContent = p.converged ? "yes" : "no";
    document.getElementById("latency").textContent = `${data.latency_ms.toFixed(2)} ms`;
    const labels = labelsByModel[data.model] || p.probabilities.map((_, i) => String(i));
    const rows = [];
    p.probabilities.forEach((prob, i) => {
      const name = document.createElement("span");
      name.textContent = labels[i];
      const bar = document.createElement("div");
      bar.className = i === p.index ? "bar top" : "bar";
      bar.style.width = `${Math.max(prob * 100, 0.5)}%`;
      const value = document.createElement("span");
      value.textContent = `${(prob * 100).toFixed(1)}%`;
      rows.push(name, bar, value);
    });
    bars.replaceChildren(...rows);
  }

  async function classify() {
    if (pending) pending.abort();
    pending = new AbortController();
    const blob = await new Promise((resolve) => pad.toBlob(resolve, "image/png"));
    const params = new URLSearchParams({ tol: currentTol().toExponential(0) });
    if (modelSelect.value) params.set("model", modelSelect.value);
    try {
      const r = await fetch(`/classify?${params}`, {
        method: "POST", headers: { "content-type": "image/png" }, body: blob, signal: pending.signal,
      });
      const data = await r.json();
      if (!r.ok) throw new Error(data.detail || r.statusText);
      error.textContent = "";
      render(data);
    } catch (e) {
      if (e.name !== "AbortError") error.textContent = String(e.message || e);
    }
  }

  async function loadModels() {
    try {
      const models = await (await fetch("/models")).json();
      for (const m of models) {
        const option = document.createElement("option");
        option.value = m.name;
        option.textContent = m.name;
        modelSelect.append(option);
      }
      for (const m of models) labelsByModel[m.name] = m.labels;
    } catch (e) {
      error.textContent = `cannot list the models: ${e}`;
    }
  }

  clearPad();
  loadModels();
})();
