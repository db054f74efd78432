// The demo page: a drawing pad, a log-scale tolerance slider, a certified-stop toggle, a target
// accuracy chosen from the model's calibrated targets (the server then picks tol), and the
// model's live answer with its trace: the residual at each iteration on a log scale, the
// tolerance line, the label at each step and the first certified one. Plain canvas drawing.
(() => {
  const pad = document.getElementById("pad");
  const ctx = pad.getContext("2d");
  const tol = document.getElementById("tol");
  const tolValue = document.getElementById("tol-value");
  const modelSelect = document.getElementById("model");
  const bars = document.getElementById("bars");
  const error = document.getElementById("error");
  const certifiedStop = document.getElementById("certified-stop");
  const target = document.getElementById("target");
  const chart = document.getElementById("trace");
  const steps = document.getElementById("steps");
  const calibration = document.getElementById("calibration");
  let drawing = false;
  let dirty = false;
  let pending = null;
  const labelsByModel = {};
  const modelsByName = {};

  function clearPad() {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
    dirty = false;
    for (const id of ["label", "iterations", "residual", "bound", "converged", "certified", "stop", "latency"]) {
      document.getElementById(id).textContent = "-";
    }
    bars.replaceChildren();
    steps.replaceChildren();
    drawTrace([], currentTol());
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
    showCalibration();
    if (dirty) classify();
  });
  certifiedStop.addEventListener("change", () => {
    showCalibration();
    if (dirty) classify();
  });
  target.addEventListener("change", () => {
    tol.disabled = target.value !== "";
    if (dirty) classify();
  });
  document.getElementById("clear").addEventListener("click", clearPad);
  modelSelect.addEventListener("change", () => {
    showTargets();
    showCalibration();
    if (dirty) classify();
  });

  // The accuracies a caller may target: each calibrated tol's one-sided 95 % lower bound.
  function showTargets() {
    const m = modelsByName[modelSelect.value];
    target.replaceChildren(target.options[0]);
    const bounds = [...new Set((m ? m.targets : []).map((r) => r.accuracy_lower_bound))].sort((a, b) => a - b);
    for (const bound of bounds) {
      const option = document.createElement("option");
      option.value = String(bound);
      option.textContent = `>= ${(bound * 100).toFixed(2)} % (95 % lower bound)`;
      target.append(option);
    }
    tol.disabled = false;
  }

  // What the model's calibration (measured at export on its test set) says of the chosen rule.
  function showCalibration() {
    const m = modelsByName[modelSelect.value];
    if (!m) return;
    certifiedStop.disabled = !m.certifies;
    if (!m.certifies) certifiedStop.checked = false;
    const fmt = (r) => `${r.mean_iterations.toFixed(1)} iterations on average, ${(r.accuracy * 100).toFixed(2)} % accuracy`
      + (r.latency_us_batch1 ? `, ${Math.round(r.latency_us_batch1)} \u00b5s alone` : "");
    let text;
    if (certifiedStop.checked) {
      text = m.certified_stop ? `certified stop: ${fmt(m.certified_stop)}` : "certified stop: not in the calibration table";
    } else {
      const row = m.tolerances.find((r) => Math.abs(Math.log10(r.tol) - Number(tol.value)) < 1e-6);
      text = row ? `calibrated at tol 1e${tol.value}: ${fmt(row)}` : `tol 1e${tol.value} is not in the calibration table`;
    }
    calibration.textContent = text + (m.certifies ? "" : " (this model does not certify labels)");
  }

  // The trace on a log scale: residual against iteration, the tolerance line, the label at each
  // step (green once certified) and a ring on the first certified iteration.
  function drawTrace(trace, tolerance) {
    const g = chart.getContext("2d");
    const W = chart.width, H = chart.height, left = 62, right = 18, top = 30, bottom = 38;
    g.clearRect(0, 0, W, H);
    const finite = trace.filter((s) => s.residual !== null && s.residual > 0);
    if (!finite.length) {
      g.fillStyle = "#94a3b8";
      g.font = "14px system-ui, sans-serif";
      g.fillText("draw a digit to see its iterations", left, H / 2);
      return;
    }
    const logs = finite.map((s) => Math.log10(s.residual)).concat([Math.log10(tolerance)]);
    const lo = Math.floor(Math.min(...logs)), hi = Math.max(Math.ceil(Math.max(...logs)), lo + 1);
    const n = trace.length;
    const pad = 14;  // the first and last points clear of the axes
    const x = (k) => left + pad + (n === 1 ? 0.5 : (k - 1) / (n - 1)) * (W - left - right - 2 * pad);
    const y = (r) => top + (hi - Math.log10(r)) / (hi - lo) * (H - top - bottom);
    g.font = "12px system-ui, sans-serif";
    g.lineWidth = 1;
    for (let d = lo; d <= hi; d++) {  // a grid line per decade
      g.strokeStyle = "#e5e7eb";
      g.beginPath(); g.moveTo(left, y(10 ** d)); g.lineTo(W - right, y(10 ** d)); g.stroke();
      g.fillStyle = "#64748b";
      g.textAlign = "right"; g.textBaseline = "middle";
      g.fillText(`1e${d}`, left - 6, y(10 ** d));
    }
    const every = Math.max(1, Math.ceil(n / 20));
    g.textAlign = "center"; g.textBaseline = "top";
    for (let k = 1; k <= n; k += every) g.fillText(String(k), x(k), H - bottom + 6);
    g.fillText("iteration", (left + W - right) / 2, H - 16);
    g.save(); g.translate(14, (top + H - bottom) / 2); g.rotate(-Math.PI / 2);
    g.fillText("residual", 0, -6); g.restore();
    g.strokeStyle = "#dc2626"; g.setLineDash([6, 4]); g.lineWidth = 1.5;  // the tolerance
    g.beginPath(); g.moveTo(left, y(tolerance)); g.lineTo(W - right, y(tolerance)); g.stroke();
    g.setLineDash([]);
    g.fillStyle = "#dc2626"; g.textAlign = "left"; g.textBaseline = "bottom";  // residuals fall: the left is free
    g.fillText(`tol ${tolerance.toExponential(0)}`, left + 4, y(tolerance) - 2);
    g.strokeStyle = "#3b82f6"; g.lineWidth = 2;
    g.beginPath();
    finite.forEach((s, i) => (i ? g.lineTo : g.moveTo).call(g, x(s.iteration), y(s.residual)));
    g.stroke();
    const labelled = n <= 40;
    for (const s of finite) {
      g.fillStyle = s.certified ? "#16a34a" : "#64748b";
      g.beginPath(); g.arc(x(s.iteration), y(s.residual), 4, 0, 2 * Math.PI); g.fill();
      if (labelled) {
        g.textAlign = "center"; g.textBaseline = "bottom";
        g.fillText(s.label, x(s.iteration), y(s.residual) - 7);
      }
    }
    const first = finite.find((s) => s.certified);
    chart.dataset.certifiedAt = first ? String(first.iteration) : "";
    chart.dataset.points = String(finite.length);
    if (first) {
      g.strokeStyle = "#16a34a"; g.lineWidth = 2;
      g.beginPath(); g.arc(x(first.iteration), y(first.residual), 9, 0, 2 * Math.PI); g.stroke();
      g.fillStyle = "#166534"; g.textAlign = "right"; g.textBaseline = "top";
      g.fillText(`label certified from iteration ${first.iteration}`, W - right, 6);
    }
  }

  function renderSteps(trace) {
    steps.replaceChildren(...trace.map((s) => {
      const step = document.createElement("span");
      step.className = s.certified ? "step certified" : "step";
      step.textContent = `${s.iteration}: ${s.label}`;
      step.title = `residual ${s.residual === null ? "not finite" : s.residual.toExponential(2)}`;
      return step;
    }));
  }

  function render(data) {
    const p = data.predictions[0];
    document.getElementById("label").textContent = p.label;
    document.getElementById("iterations").textContent = p.iterations;
    const exp = (v) => (v === null ? "-" : v.toExponential(2));
    document.getElementById("residual").textContent = exp(p.residual);
    document.getElementById("bound").textContent = exp(p.error_bound);
    document.getElementById("converged").textContent = p.converged ? "yes" : "no";
    document.getElementById("certified").textContent = p.label_certified ? "yes" : "no";
    document.getElementById("stop").textContent = data.chosen
      ? `${data.stop}, tol ${data.tol.toExponential(0)} chosen by ${data.chosen.by}`
      : data.stop;
    drawTrace(p.trace || [], data.tol);
    renderSteps(p.trace || []);
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
    const params = new URLSearchParams({ trace: "true" });
    if (target.value) params.set("target_accuracy", target.value);
    else params.set("tol", currentTol().toExponential(0));
    if (certifiedStop.checked) params.set("stop", "certified");
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
      for (const m of models) {
        labelsByModel[m.name] = m.labels;
        modelsByName[m.name] = m;
      }
      showTargets();
      showCalibration();
    } catch (e) {
      error.textContent = `cannot list the models: ${e}`;
    }
  }

  clearPad();
  loadModels();
})();
