// A tiny line chart on <canvas>: a few series, a moving window, auto-scaled y axis.
// No library: the pages must work without a build step and stay small.

export class LineChart {
  /**
   * @param {HTMLCanvasElement} canvas
   * @param {{series: {label: string, color: string}[], points?: number, min?: number, unit?: string}} opts
   */
  constructor(canvas, opts) {
    this.canvas = canvas;
    this.series = opts.series;
    this.points = opts.points || 60;
    this.min = opts.min ?? 0;
    this.unit = opts.unit || '';
    this.data = this.series.map(() => []);
    this.pending = false;
    if (typeof ResizeObserver !== 'undefined') new ResizeObserver(() => this.draw()).observe(canvas);
    this.draw();
  }

  /** Appends one value per series. */
  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      if (!d) return;
      d.push(Number.isFinite(v) ? v : null);
      if (d.length > this.points) d.shift();
    });
    this.schedule();
  }

  /** Replaces every series' values. */
  set(arrays) {
    this.data = this.series.map((_, i) => (arrays[i] || []).slice(-this.points));
    this.schedule();
  }

  schedule() {
    // Coalesce bursts of updates into one paint per frame.
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  draw() {
    const c = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || 300;
    const h = c.clientHeight || 140;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext('2d');
    if (!g) return;
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const style = getComputedStyle(document.documentElement);
    const muted = style.getPropertyValue('--muted').trim() || '#888';
    const line = style.getPropertyValue('--line').trim() || '#ddd';
    let max = this.min + 1;
    for (const d of this.data) for (const v of d) if (v !== null && v > max) max = v;
    max = niceCeil(max);
    const left = 44;
    const top = 24;
    const bottom = h - 6;
    const right = w - 6;
    g.font = '11px system-ui, sans-serif';
    g.textBaseline = 'middle';
    g.lineWidth = 1;
    for (let i = 0; i <= 2; i++) {
      const y = bottom - ((bottom - top) * i) / 2;
      g.strokeStyle = line;
      g.beginPath();
      g.moveTo(left, Math.round(y) + 0.5);
      g.lineTo(right, Math.round(y) + 0.5);
      g.stroke();
      g.fillStyle = muted;
      g.fillText(short(this.min + ((max - this.min) * i) / 2) + this.unit, 2, y);
    }
    const step = (right - left) / Math.max(1, this.points - 1);
    this.data.forEach((d, si) => {
      g.strokeStyle = this.series[si].color;
      g.lineWidth = 2;
      g.beginPath();
      let started = false;
      // A series still filling up grows from the left; a full one scrolls.
      const offset = 0;
      d.forEach((v, i) => {
        if (v === null) {
          started = false;
          return;
        }
        const x = left + (offset + i) * step;
        const y = bottom - ((v - this.min) / (max - this.min)) * (bottom - top);
        if (started) g.lineTo(x, y);
        else g.moveTo(x, y);
        started = true;
      });
      g.stroke();
    });
    let x = left;
    g.textBaseline = 'top';
    this.series.forEach((s, i) => {
      const last = this.data[i][this.data[i].length - 1];
      // Values only where they fit: with many series the legend would run off the canvas.
      const showValue = this.series.length <= 2 && last !== undefined && last !== null;
      const text = `${s.label}${showValue ? ` ${short(last)}${this.unit}` : ''}`;
      g.fillStyle = s.color;
      g.fillRect(x, 4, 8, 8);
      g.fillStyle = muted;
      g.fillText(text, x + 11, 2);
      x += g.measureText(text).width + 24;
    });
  }
}

function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function short(v) {
  if (Math.abs(v) >= 1e6) return `${(v / 1e6).toFixed(1)}M`;
  if (Math.abs(v) >= 1e4) return `${(v / 1e3).toFixed(0)}k`;
  if (Math.abs(v) >= 1e3) return `${(v / 1e3).toFixed(1)}k`;
  return Number.isInteger(v) ? String(v) : v.toFixed(1);
}
