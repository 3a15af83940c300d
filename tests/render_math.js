// Renders every TeX string given on stdin (a JSON list of {"tex", "display", "where"}) with KaTeX and prints
// a JSON list of the ones that fail: {"where", "tex", "error"}. Used by tests/test_notebook_math.py.
const katex = require(process.env.KATEX_PATH || "katex");
let input = "";
process.stdin.on("data", (d) => (input += d));
process.stdin.on("end", () => {
  const errors = [];
  for (const item of JSON.parse(input)) {
    try {
      katex.renderToString(item.tex, { displayMode: item.display, throwOnError: true, strict: "ignore" });
    } catch (e) {
      errors.push({ where: item.where, tex: item.tex, error: String(e.message || e) });
    }
  }
  process.stdout.write(JSON.stringify(errors));
});
