// noisecraft's extension for the ComfyUI editor (listed by GET /editor/api/extensions).
// The editor's stock default graph names models this server does not have (and probes
// downloads of them on huggingface.co).  Wherever the editor loads that stock graph, load the
// server's default instead: the same txt2img graph for a checkpoint the server has, or an
// empty graph when the server cannot run it (the reason is logged).  The editor asks for its
// default in two ways (comfyui-frontend-package 1.58): on a first visit with nothing to
// restore, start-up calls app.loadGraphData() with no graph (loadGraphDataNow then falls back
// to the stock graph itself); "Load Default Workflow" and closing the last tab pass the stock
// graph object.  Both go through app.loadGraphData, so both are caught here.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BLANK = { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
  config: {}, extra: {}, version: 0.4 };

function isStockDefault(graph) {
  // No graph object at all: loadGraphDataNow would load the stock graph in its place.
  if (!graph || typeof graph !== "object" || Array.isArray(graph)) return true;
  const stock = window.comfyAPI?.defaultGraph?.defaultGraph;
  if (!stock) return false;
  return graph === stock || JSON.stringify(graph) === JSON.stringify(stock);
}

app.registerExtension({
  name: "noisecraft.defaultWorkflow",
  async init() {
    let answer = { workflow: null, reason: "the server's default workflow was not read" };
    try {
      answer = await (await api.fetchApi("/noisecraft/default_workflow")).json();
    } catch (e) {
      console.warn("noisecraft: reading the default workflow failed:", e);
    }
    const load = app.loadGraphData.bind(app);
    app.loadGraphData = function (graph, ...rest) {
      if (isStockDefault(graph)) {
        if (!answer.workflow) console.warn(`noisecraft: empty default graph: ${answer.reason}`);
        graph = structuredClone(answer.workflow ?? BLANK);
      }
      return load(graph, ...rest);
    };
  },
});
