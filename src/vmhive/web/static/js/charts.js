// Time-series charts with uPlot, fed by the columnar metrics answers
// ({timestamps: [...], series: {name: [...]}}).

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { bytes, html, loadCss, setHtml } from "./util.js";

loadCss("/ui/vendor/uplot/uPlot.min.css");

const COLORS = ["#1d4ed8", "#b45309", "#15803d", "#9333ea"];

export const FORMATS = {
  percent: (v) => (v === null || v === undefined ? "–" : `${v.toFixed(1)} %`),
  bytes: (v) => (v === null || v === undefined ? "–" : bytes(v)),
  rate: (v) => (v === null || v === undefined ? "–" : `${bytes(v)}/s`),
};

/**
 * A chart per spec: {id, title, unit: percent|bytes|rate, lines: [[seriesName, label]]}.
 * Renders into `container`; returns {update(metrics), destroy()}.
 */
export function chartGrid(container, specs) {
  setHtml(
    container,
    html`<div class="charts">${specs.map(
      (spec) =>
        html`<section class="card chart" data-testid="chart-${spec.id}" aria-label="${spec.title}">
          <h3>${spec.title}</h3><div class="plot" data-points="0"></div></section>`,
    )}</div>`,
  );
  const plots = new Map();
  const observer = new ResizeObserver(() => {
    for (const [id, plot] of plots) {
      const box = container.querySelector(`[data-testid="chart-${id}"] .plot`);
      if (box && box.clientWidth) plot.setSize({ width: box.clientWidth, height: 180 });
    }
  });

  function update(metrics) {
    for (const spec of specs) {
      const box = container.querySelector(`[data-testid="chart-${spec.id}"] .plot`);
      if (!box) continue;
      const timestamps = metrics.timestamps || [];
      const columns = spec.lines.map(([name]) => (metrics.series || {})[name] || timestamps.map(() => null));
      const data = [timestamps, ...columns];
      const points = columns.reduce((n, col) => n + col.filter((v) => v !== null && v !== undefined).length, 0);
      box.dataset.points = String(points);
      let plot = plots.get(spec.id);
      if (plot) {
        plot.setData(data);
        continue;
      }
      const format = FORMATS[spec.unit];
      plot = new uPlot(
        {
          width: box.clientWidth || 420,
          height: 180,
          legend: { show: true },
          cursor: { drag: { x: false, y: false } },
          scales: { y: spec.unit === "percent" ? { range: [0, 100] } : { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
          axes: [{}, { size: 70, values: (_u, ticks) => ticks.map(format) }],
          series: [
            {},
            ...spec.lines.map(([, label], i) => ({
              label,
              stroke: COLORS[i % COLORS.length],
              fill: i === 0 ? `${COLORS[0]}1a` : undefined,
              width: 1.5,
              value: (_u, v) => format(v),
              spanGaps: false,
            })),
          ],
        },
        data,
        box,
      );
      plots.set(spec.id, plot);
      observer.observe(box);
    }
  }

  return {
    update,
    destroy() {
      observer.disconnect();
      for (const plot of plots.values()) plot.destroy();
      plots.clear();
    },
  };
}

export const VM_CHARTS = [
  { id: "cpu", title: "CPU", unit: "percent", lines: [["cpu_percent", "CPU"]] },
  { id: "memory", title: "Memory", unit: "bytes", lines: [["memory_bytes", "used"]] },
  { id: "disk", title: "Disk I/O", unit: "rate", lines: [["disk_read_bps", "read"], ["disk_write_bps", "write"]] },
  { id: "net", title: "Network", unit: "rate", lines: [["net_rx_bps", "received"], ["net_tx_bps", "sent"]] },
];

export const HOST_CHARTS = [
  { id: "cpu", title: "Host CPU", unit: "percent", lines: [["cpu_percent", "CPU"]] },
  { id: "memory", title: "Host memory", unit: "bytes", lines: [["memory_used_bytes", "used"], ["memory_total_bytes", "total"]] },
  { id: "storage", title: "Host storage", unit: "bytes", lines: [["storage_used_bytes", "used"], ["storage_total_bytes", "total"]] },
];

export const RANGES = ["hour", "day", "week"];

/** A range picker (radio buttons) calling `onChange(range)`. */
export function rangePicker(container, current, onChange) {
  setHtml(
    container,
    html`<div class="row" role="radiogroup" aria-label="Time range">${RANGES.map(
      (r) =>
        html`<label class="inline"><input type="radio" name="range" value="${r}" ${r === current ? html`checked` : ""} data-testid="range-${r}"> last ${r}</label>`,
    )}</div>`,
  );
  container.addEventListener("change", (e) => {
    if (e.target.name === "range") onChange(e.target.value);
  });
}
