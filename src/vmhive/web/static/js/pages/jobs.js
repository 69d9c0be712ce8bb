// Jobs: running and recent ones with live progress; a job's log on demand.

import { enc, get, post } from "../api.js";
import * as live from "../live.js";
import { $, badge, html, setHtml, showError, when } from "../util.js";

function targetText(job) {
  const name = job.params && job.params.name;
  return name ? `${name}` : job.target || "–";
}

export function jobRowHtml(job) {
  const cancellable = job.state === "queued" || job.state === "running";
  return html`<tr data-job="${job.id}" data-testid="job-row" data-state="${job.state}">
<td class="mono"><button type="button" class="link" data-op="log" aria-label="Show the log of job ${job.id}">${job.id.slice(0, 8)}</button></td>
<td>${job.kind}</td><td>${targetText(job)}</td>
<td>${badge(job.state)}</td>
<td><span class="progress" role="progressbar" aria-valuenow="${job.progress}" aria-valuemin="0" aria-valuemax="100"><span style="width:${job.progress}%"></span></span>${job.progress} %</td>
<td>${when(job.created_at)}</td>
<td class="error">${job.error || ""}</td>
<td>${cancellable ? html`<button type="button" class="small" data-op="cancel">Cancel</button>` : ""}</td>
</tr>`;
}

export function jobTable(jobs, testid = "jobs", empty = "No jobs") {
  return html`<div class="table-wrap"><table data-testid="${testid}">
    <thead><tr><th>Job</th><th>Kind</th><th>Target</th><th>State</th><th>Progress</th><th>Created</th><th>Error</th><th></th></tr></thead>
    <tbody>${jobs.length ? jobs.map(jobRowHtml) : html`<tr><td colspan="8" class="empty">${empty}</td></tr>`}</tbody></table></div>`;
}

/** Click handling for job tables inside `root`: log and cancel buttons. */
export function handleJobClicks(root) {
  root.addEventListener("click", async (event) => {
    const button = event.target.closest("button[data-op]");
    if (!button || !button.closest("tr[data-job]")) return;
    const id = button.closest("tr").dataset.job;
    if (button.dataset.op === "cancel") {
      await post(`/api/jobs/${enc(id)}/cancel`).catch(showError);
    } else if (button.dataset.op === "log") {
      const detail = root.querySelector("#job-detail");
      try {
        const job = await get(`/api/jobs/${enc(id)}`);
        setHtml(
          detail,
          html`<div class="card" style="margin-top:1rem" data-testid="job-log"><h3>${job.kind} · ${job.id}</h3>
          <p class="muted">${when(job.started_at)} → ${when(job.finished_at)}</p>
          <pre class="log">${job.log.map((l) => `${new Date(l.at).toLocaleTimeString()}  ${l.message}\n`).join("") || "(no log)"}</pre></div>`,
        );
        detail.scrollIntoView({ block: "nearest" });
      } catch (error) {
        showError(error);
      }
    }
  });
}

export async function render(main) {
  setHtml(
    main,
    html`<div class="toolbar"><h1>Jobs</h1><span class="spacer"></span>
      <label class="inline"><input type="checkbox" id="only-active"> Only running and queued</label></div>
    <h2>Running</h2><div id="running"></div>
    <h2>Recent</h2><div id="recent"></div>
    <div id="job-detail"></div>`,
  );
  let jobs = [];
  const paint = () => {
    const active = jobs.filter((j) => !live.ENDED.has(j.state));
    setHtml($("#running"), jobTable(active, "running-jobs", "Nothing running"));
    setHtml($("#recent"), $("#only-active").checked ? html`` : jobTable(jobs.filter((j) => live.ENDED.has(j.state)), "recent-jobs"));
  };
  const refetch = async () => {
    jobs = await get("/api/jobs?limit=100");
    paint();
  };
  handleJobClicks(main);
  $("#only-active").addEventListener("change", paint);
  let pending = null;
  const offJob = live.on("job", (job) => {
    const index = jobs.findIndex((j) => j.id === job.id);
    const wasActive = index >= 0 && !live.ENDED.has(jobs[index].state);
    if (index >= 0) jobs[index] = { ...jobs[index], ...job };
    else jobs.unshift(job);
    const row = main.querySelector(`tr[data-job="${CSS.escape(job.id)}"]`);
    if (row && wasActive === !live.ENDED.has(job.state)) {
      const tpl = document.createElement("template");
      tpl.innerHTML = jobRowHtml(jobs[index >= 0 ? index : 0]).text;
      row.replaceWith(tpl.content.firstElementChild);
    } else {
      clearTimeout(pending);
      pending = setTimeout(paint, 100); // batch bursts of new jobs into one repaint
    }
  });
  const offResync = live.on("resync", () => refetch().catch(showError));
  await refetch();
  return () => {
    offJob();
    offResync();
    clearTimeout(pending);
  };
}
