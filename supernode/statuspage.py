"""The supernode's live status page: one static HTML document, no build step.

It polls ``GET /status`` (JSON) every second and draws one row per blob: how much of it the
seeder has read from the registry, how many hosts are pulling it and how many have all of it.
Everything is rendered with DOM text nodes (no innerHTML with data), so repository names from
the network cannot inject markup.
"""

from __future__ import annotations

STATUS_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>supernode status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  #summary { color: #555; margin-bottom: 1em; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #ddd; }
  td.num { text-align: right; font-variant-numeric: tabular-nums; }
  .bar { position: relative; background: #eee; height: 1.1em; min-width: 12em; }
  .bar > div { position: absolute; left: 0; top: 0; bottom: 0; }
  .seeded { background: #9cc3e6; }
  .complete { background: #2e7d32; opacity: .85; }
  .state-failed { color: #b00020; font-weight: bold; }
  .state-ready { color: #2e7d32; }
  code { font-size: .9em; }
</style>
</head>
<body>
<h1>supernode</h1>
<div id="summary">loading&hellip;</div>
<table>
  <thead><tr>
    <th>blob</th><th>repository</th><th class="num">size</th><th>state</th>
    <th>seeded from the registry / hosts with all of it</th><th class="num">hosts</th>
  </tr></thead>
  <tbody id="tasks"></tbody>
</table>
<script>
function cell(row, text, cls) {
  const td = document.createElement("td");
  if (cls) td.className = cls;
  td.appendChild(document.createTextNode(text));
  row.appendChild(td);
  return td;
}
function mib(n) { return (n / 1048576).toFixed(1) + " MiB"; }
async function refresh() {
  try {
    const r = await fetch("/status", {cache: "no-store"});
    const s = await r.json();
    const body = document.getElementById("tasks");
    body.textContent = "";
    for (const t of s.tasks) {
      const row = document.createElement("tr");
      const blob = cell(row, "");
      const code = document.createElement("code");
      code.textContent = t.digest.slice(0, 19) + "\\u2026";
      code.title = t.digest;
      blob.appendChild(code);
      cell(row, t.repository);
      cell(row, mib(t.size), "num");
      cell(row, t.state + (t.failure ? ": " + t.failure : ""), "state-" + t.state);
      const bars = cell(row, "");
      const bar = document.createElement("div");
      bar.className = "bar";
      const seeded = document.createElement("div");
      seeded.className = "seeded";
      seeded.style.width = (t.pieces ? 100 * t.seeded / t.pieces : 100) + "%";
      const done = document.createElement("div");
      done.className = "complete";
      done.style.width = (t.peers ? 100 * t.peers_complete / t.peers : 0) + "%";
      done.style.top = "55%";
      bar.appendChild(seeded);
      bar.appendChild(done);
      bars.appendChild(bar);
      cell(row, t.peers_complete + " / " + t.peers, "num");
      body.appendChild(row);
    }
    document.getElementById("summary").textContent =
      s.tasks.length + " blobs, seeder at " + s.seeder + ", " +
      s.scheduler.peers + " host memberships, " + s.scheduler.active_links + " parent links";
  } catch (e) {
    document.getElementById("summary").textContent = "status unavailable: " + e;
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
