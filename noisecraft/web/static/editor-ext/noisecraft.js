// noisecraft's extension for the ComfyUI editor (listed by GET /editor/api/extensions).
// The editor's stock default graph names models this server does not have (and links to
// downloads of them).  Wherever the editor loads that stock graph (first visit, "Load
// Default Workflow"), load the server's default instead: the same txt2img graph for a
// checkpoint the server has, or an empty graph when the server cannot run it (the reason is
// logged).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BLANK = { last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
  config: {}, extra: {}, version: 0.4 };

function isStockDefault(graph) {
  const stock = window.comfyAPI?.defaultGraph?.defaultGraph;
  if (!stock || !graph) return false;
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
