"""README tables from the results files: ``python -m vdu report`` rewrites every block of README.md
between ``<!-- report:NAME -->`` and ``<!-- /report -->`` from ``results/``; ``--check`` only says whether
the README is up to date (exit 1 if not: a test runs it, so a table cannot drift from its numbers).

One function per table, named in :data:`TABLES`; each reads the results file its notebook wrote and
returns markdown. A table whose results file is missing says so instead of showing numbers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .results import REPO

BLOCK = re.compile(r"(<!-- report:(?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def _load(path: str, root: Path) -> dict | None:
    p = root / path
    return json.loads(p.read_text()) if p.exists() else None


def _ci(v, ci, fmt="{:.2f}"):
    if ci is None:
        return fmt.format(v)
    return f"{fmt.format(v)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _u_fid_ratio(r) -> str:
    """A row's u-FID ratio to the pretrained model, with the after-interval over the pretrained point value."""
    ci = r.get("u_fid_after_ci")
    return _ci(r["u_fid_ratio"], None if ci is None else [x / r["u_fid_before"] for x in ci])


def duality(root: Path) -> str:
    d = _load("results/gmm/duality.json", root)
    if d is None:
        return "_results/gmm/duality.json not written yet (`make run-all DATASETS=gmm`)._\n"
    ex, le = d["exact"], d["learned"]
    ks = ("ru", "fu", "lu")
    rows = ["| | RU (reverse KL) | FU (forward KL) | LU (likelihood) |", "|---|---|---|---|",
            "| exact dual optimum lambda* | " + " | ".join(f"{ex[k]['lambda'][0]:.5g}" for k in ks) + " |",
            "| duality gap (target < 1e-3) | " + " | ".join(f"{abs(ex[k]['gap']):.0e}" for k in ks) + " |",
            "| learned lambda (primal-dual), error (target < 10%) | " + " | ".join(
                f"{le[k]['lambda'][0]:.4g}, {'' if le[k]['within_lam_tol'] else '**'}{100 * le[k]['lambda_rel_error']:.1f}%"
                f"{'' if le[k]['within_lam_tol'] else '**'}" for k in ks) + " |",
            "| KL(target ‖ learned), tolerance 0.05 nats | " + " | ".join(
                f"{'' if le[k]['within_kl_tol'] else '**'}{le[k]['kl_target_to_learned']:.3f}"
                f"{'' if le[k]['within_kl_tol'] else '**'}" for k in ks) + " |",
            "| exact target: largest retained-mode shift | " + " | ".join(
                f"{max(d['modes'][k]['exact']['shift'][1:]):.3f}" for k in ks) + " |"]
    return "\n".join(rows) + f"\n\n{d['machine']}, {d['wall_time_s']:.0f} s, written {d['written']}.\n"


def constrained(root: Path) -> str:
    d = _load("results/mnist/constrained_unlearning.json", root)
    if d is None:
        return "_results/mnist/constrained_unlearning.json not written yet (`make run-all`)._\n"
    c, ev = d["concept"], d["evaluation"]
    b = d["before"]["summary"]
    out = [f"Concept: prompt {c} of `{d['cond_model']}`; {ev['n_per_prompt']} samples per prompt ({ev['sampler']}, seed "
           f"bank {ev['seed_bank']}); every run {d['concept_loop']['steps']} steps, lr {d['concept_loop']['lr']:g}, batch "
           f"{d['concept_loop']['batch_size']}. Pretrained: prompt {c} yields a {c} in "
           f"{b[f'forget_rate_{c}']:.0%} of its samples; retained prompts' label accuracy {b['label_accuracy']:.3f}, "
           f"domain FID {b['fid']:.2f} (means over the 9 retained prompts).", "",
           "| run | guidance | forget rate of prompt [95% CI] | retained label accuracy [95% CI] (drop) | "
           "retained FID (x) [95% CI] | deviation on retained prompts | stop | s |", "|---|---|---|---|---|---|---|---|"]
    for r in d["esd"] + d["ru"] + d.get("lu", []):
        ci = [p["label_accuracy_ci"] for p in r["eval"]["prompts"] if p["erased"]][0]
        if r["method"] == "esd":
            name, g = f"ESD η = {r['eta']:g}", f"η = {r['eta']:g} (fixed)"
        elif r["method"] == "ru":
            a = r["duals"][-1]["alpha"][0] if r["duals"] else float("nan")
            name, g = f"RU κ = {r['kl_min']:g}", f"α → {a:.2f} (dual)"
        else:
            lam = r["duals"][-1]["lam"][0] if r["duals"] else float("nan")
            name, g = f"LU ε = {r['eps']:g}", f"λ → {lam:.2f} (dual) × w"
        out.append(f"| {name} | {g} | {_ci(r['forget_rate'][0], ci)} | "
                   f"{_ci(r['retained_accuracy'], r.get('retained_accuracy_ci'), '{:.3f}')} ({r['accuracy_drop']:+.3f}) | "
                   f"{_ci(r['fid_ratio'], r.get('fid_ratio_ci'))} | {r['deviation']:.2e} | {r['stop']} | "
                   f"{r['unlearn_s']:.0f} |")
    if d.get("lu"):
        out += ["", f"LU's concept weight w: `{d['lu_classifier']}` (the second evaluator); the forget rate is "
                f"measured by the first. Retained intervals: bootstrap over each prompt's samples, the mean's "
                f"interval from the prompts' resamples; FID ratios against the pretrained model's point value."]
    m = d["multi"]
    out += ["", f"Two prompts at once (RU, κ = {m['kl_min']:g}): forget rates "
            + ", ".join(f"{k}: {v:.2f}" for k, v in zip(d["concepts_multi"], m["forget_rate"]))
            + f"; retained label accuracy {m['retained_accuracy']:.3f} ({m['accuracy_drop']:+.3f}), FID x{m['fid_ratio']:.2f}. "
            f"Unreachable threshold (κ = {d['infeasible']['options']['kl_min']:g}, α ≤ "
            f"{d['infeasible']['options']['alpha_max']:g}): stop reason `{d['infeasible']['stop_reason']}` after "
            f"{d['infeasible']['steps']} steps."]
    v = d["vdu_dual"]
    if v["rows"]:
        out += ["", f"VDU with γ from the likelihood constraint (function-space stability, forget ratio "
                f"{v['options']['forget_ratio']:g}, {v['options']['steps']} steps, no stop rule; "
                f"{v['evaluation']['samples']} samples, DDIM {v['evaluation']['ddim_steps']}):", "",
                "| class | PUL % [95% CI] | u-FID (x) [95% CI] | γ at the end | hand-tuned PUL % [95% CI] | hand-tuned u-FID (x) |",
                "|---|---|---|---|---|---|"]
        ht = v.get("hand_tuned") or {}
        hand = ht.get("rows", {})
        for r in v["rows"]:
            h = hand.get(str(r["forget_class"])) or hand.get(r["forget_class"]) or {}
            out.append(f"| {r['forget_class']} | {_ci(r['pul'], r.get('pul_ci'), '{:.1f}')} | {_u_fid_ratio(r)} | "
                       f"{r['gamma_end']:.3f} | {_ci(h.get('pul', float('nan')), h.get('pul_ci'), '{:.1f}')} | "
                       f"{h.get('u_fid_ratio', float('nan')):.2f} |")
        mo = ht.get("mean_over_classes")
        if mo:
            n = ht.get("samples")
            out += ["", f"Mean over classes {mo['classes']}: PUL {mo['pul_dual']:.1f}% (dual) vs {mo['pul_hand']:.1f}% "
                    f"(hand-tuned γ 0.8 + stop at 1.3x); u-FID ratio {mo['u_fid_ratio_dual']:.2f} vs "
                    f"{mo['u_fid_ratio_hand']:.2f}."
                    + (f" The hand-tuned rows (`{ht.get('source')}`) use {', '.join(f'{k:,}' for k in n)} samples per "
                       f"model, this table {v['evaluation']['samples']}: compare the intervals, not the points."
                       if n and not ht.get("same_evaluation") else "")]
    out += ["", f"{d['machine']}, notebook {d['notebook_wall_s'] / 60:.0f} min, written {d['written']}."]
    return "\n".join(out) + "\n"


def data(root: Path) -> str:
    d = _load("results/mnist/data_unlearning.json", root)
    if d is None:
        return "_results/mnist/data_unlearning.json not written yet (`make run-all`)._\n"
    ev = d["evaluation"]

    def row(name, r, extra=""):
        return (f"| {name} | {_ci(r['mark_rate'], r.get('mark_rate_ci'), '{:.3f}')} | "
                f"{_ci(r['membership_gap'], r.get('membership_gap_ci'), '{:+.4f}')} | {_ci(r['fid'], r.get('fid_ci'))} | "
                f"{r['confident_share']:.2f} | {extra} |")

    out = [f"`{d['canary_model']}`, {d['n_canaries']} trained + {d['n_canaries']} held-out canaries; {ev['n_samples']} "
           f"samples per model ({ev['sampler']}, seed bank {ev['seed_bank']}); NLL: {ev['nll']}; FID: {ev['fid']}; "
           f"every run {d['loop']['steps']} steps, batch {d['loop']['batch_size']}.", "",
           "| model | mark rate [95% CI] | membership gap, bits/dim [95% CI] | FID [95% CI] | confident | run |",
           "|---|---|---|---|---|---|",
           row("canary model", d["before"], "—"), row("never saw the canaries", d["never_saw_canaries"], "—")]
    for r in d["rows"]:
        knob = {k: r[k] for k in ("forget_ratio", "lam_max", "lr") if k in r}
        name = r["entry"] + ("" if not knob else " (" + ", ".join(f"{k} {v:g}" for k, v in knob.items()) + ")")
        out.append(row(("**" + name + "**") if r.get("targets_met") else name, r,
                       f"{r['steps']} steps, {r['stop']}, {r['unlearn_s']:.0f} s"))
    inf = d["infeasible"]
    out += ["", f"Bold: the canary targets met (mark rate <= 10% of the canary model's, FID <= 1.1x, gap interval "
            f"overlapping the never-saw model's). A threshold beyond retraining (forget ratio "
            f"{inf['options']['forget_ratio']:g}): stop reason `{inf['stop_reason']}`.",
            "", f"{d['machine']}, notebook {d['notebook_wall_s'] / 60:.0f} min, written {d['written']}."]
    return "\n".join(out) + "\n"


def evaluation(root: Path) -> str:
    d = _load("results/mnist/evaluation.json", root)
    if d is None:
        return "_results/mnist/evaluation.json not written yet (`make run-all`)._\n"
    c, ts = d["forget_class"], d["table_sampler"]

    def pul(r, suffix=""):
        v = r.get("pul" + suffix)
        return "undefined" if v is None or v != v else _ci(v, r.get(f"pul{suffix}_ci"), "{:.1f}")

    o = d["options"]
    out = [f"`{d['model']}`, forget class {c}, `{d['method']}` ({o.get('stability')} stability, gamma {o.get('gamma')}, "
           f"lr {o.get('lr'):g}, {d['n_forget']} forget images): stopped after {d['unlearn']['steps']} steps "
           f"({d['unlearn']['stop']}). {d['n_samples']} samples per bank and model; intervals: paired bootstrap, "
           f"{d['bootstrap']} resamples. Second evaluator: `{d['second_evaluator']}`.", "",
           f"| seed bank ({ts[0]} {ts[1]}) | class-{c} samples before → after | PUL % [95% CI] | PUL %, second "
           f"evaluator | label agreement (original model's samples) |", "|---|---|---|---|---|"]
    for r in d["seed_banks"]:
        b, a = r["before"], r["after"]
        out.append(f"| {r['seed_bank']} | {b['counts'][c]} → {a['counts'][c]} | {pul(a)} | {pul(a, '_second')} | "
                   f"{b['label_agreement']:.3f} |")
    p, p2 = d["pooled"], d["pooled_second"]
    out.append(f"| **pooled** ({p['n_samples']} samples) | {p['forget_before']} → {p['forget_after']} | "
               f"**{_ci(p['pul'], p['pul_ci'], '{:.1f}')}** | {_ci(p2['pul'], p2['pul_ci'], '{:.1f}')} | |")
    out += ["", "| sampler (bank 0) | forget share before | PUL % [95% CI] | PUL %, second evaluator | u-FID before "
            "| u-FID after | ratio |", "|---|---|---|---|---|---|---|"]
    for r in d["sampler"]:
        b, a = r["before"], r["after"]
        out.append(f"| {r['sampler']} {r['steps']} | {_ci(b['forget_share'], b.get('forget_share_ci'), '{:.3f}')} | "
                   f"{pul(a)} | {pul(a, '_second')} | {_ci(b['u_fid'], b.get('u_fid_ci'))} | "
                   f"{_ci(a['u_fid'], a.get('u_fid_ci'))} | {r['u_fid_ratio']:.2f} |")
    out += ["", "Samples per model for a PUL to exclude its neighbour at this forget share: " + "; ".join(
        f"{b['pul']:.0f}% vs {b['other']:.0f}%: {b['samples']:,}" for b in d["budget"]) + ".",
            "", f"{d['machine']}, notebook {d['wall_time_s'] / 60:.0f} min, written {d['written']}."]
    return "\n".join(out) + "\n"


def vdu_classes(root: Path) -> str:
    d = _load("results/mnist/vdu_unlearning.json", root)
    if d is None:
        return "_results/mnist/vdu_unlearning.json not written yet (`make run-all`)._\n"
    rows = {(r["config"], r["forget_class"]): r for r in d["classes"]}
    classes = sorted({c for _, c in rows})
    names = [n for n in ("vdu", "vdu-function") if any(k[0] == n for k in rows)]

    def met(r):     # the target holds for the interval: PUL's lower end and u-FID's upper end, where there are some
        lo = (r.get("pul_ci") or [r["pul"]])[0]
        hi = (r.get("u_fid_after_ci") or [r["u_fid_after"]])[-1] / r["u_fid_before"]
        return lo >= 95.0 and hi <= 1.5

    def pul(r):
        v = _ci(r["pul"], r.get("pul_ci"), "{:.1f}")
        return f"**{v}**" if met(r) else v

    head = "| forget class | forget share before | " + " | ".join(
        f"`{n}` PUL % | `{n}` u-FID (x) | `{n}` confident" for n in names) + \
        " | `vdu-function` NLL forget / retain (bits/dim) | steps (stop) | s |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    stop = lambda r: f"{r['steps']} ({r['stop'].replace('_', ' ')})"            # noqa: E731
    for c in classes:
        rs = [rows.get((n, c)) for n in names]
        first = next(r for r in rs if r)
        cells = [str(c), f"{first['forget_share_before']:.3f}"]
        for r in rs:
            cells += ["—"] * 3 if r is None else [pul(r), f"{_ci(r['u_fid_after'], r.get('u_fid_after_ci'))} "
                                                  f"({r['u_fid_ratio']:.2f}x)", f"{r['confident_share_after']:.2f}"]
        f = rows.get(("vdu-function", c))
        cells.append("—" if f is None or "forget_nll_after" not in f else
                     f"{f['forget_nll_before']:.3f} → {f['forget_nll_after']:.3f} / {f['retain_nll_before']:.3f} → "
                     f"{f['retain_nll_after']:.3f}")
        cells.append(" / ".join(stop(r) for r in rs if r))
        cells.append(" / ".join(f"{r['unlearn_s']:.0f}" for r in rs if r))
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| over the classes | mean PUL | mean u-FID ratio | mean confident share after (before "
            f"{rows[(names[0], classes[0])]['confident_share_before']:.2f}) | target met | seconds per class |",
            "|---|---|---|---|---|---|"]
    for n in names:
        rs = [rows[(n, c)] for c in classes if (n, c) in rows]
        ok = [r["forget_class"] for r in rs if met(r)]
        secs = [r["unlearn_s"] for r in rs]
        out.append(f"| `{n}` | {sum(r['pul'] for r in rs) / len(rs):.1f}% | "
                   f"{sum(r['u_fid_ratio'] for r in rs) / len(rs):.2f}x | "
                   f"{sum(r['confident_share_after'] for r in rs) / len(rs):.2f} | {len(ok)} / {len(rs)}"
                   f"{' (classes ' + ', '.join(map(str, ok)) + ')' if ok else ''} | "
                   f"{min(secs):.0f}-{max(secs):.0f} (mean {sum(secs) / len(secs):.0f}) |")
    ev = d["evaluation"]
    out += ["", f"{ev.get('table_samples', ev['samples']):,} samples per model (DDIM {ev['ddim_steps']}, seed bank {ev['seed_bank']}); "
            + ("intervals: paired bootstrap, 95%. " if any("pul_ci" in r for r in d["classes"]) else
               "no intervals (this run predates them). ")
            + f"Bold: PUL >= 95% and u-FID <= 1.5x the pretrained model's, for the whole interval where there is "
              f"one (PUL's lower end, u-FID's upper end). "
              f"{d['machine']}, notebook {d['notebook_wall_s'] / 60:.0f} min, written {d['written']}."]
    return "\n".join(out) + "\n"


def posteriors(root: Path) -> str:
    d = _load("results/mnist/posteriors.json", root)
    if d is None:
        return "_results/mnist/posteriors.json not written yet (`make run-all`)._\n"
    ev, c = d["evaluation"], d["common"]
    out = [f"Class {d['forget_class']}, {d['n_forget']} forget images; {ev['n_samples']} samples per model "
           f"({ev['sampler']}, seed bank {ev['seed_bank']}); VDU with the paper's B at γ {c['gamma']}, stop rule "
           f"{c['stop_forget_ratio']}, at most {c['steps']} steps.", "",
           "| posterior | K | σ* 1% / median / 99% | 99%/1% | rank corr. with snapshots | built (s) |",
           "|---|---|---|---|---|---|"]
    for kind, st in d["sigma"].items():
        out.append(f"| {kind} | {st['k']} | {st['sigma_q01']:.1e} / {st['sigma_median']:.1e} / {st['sigma_q99']:.1e} | "
                   f"{st['spread_99_1']:.1f} | {st['rank_corr']:.3f} | {st['build_s']:.0f} |")
    opts = list(d["optimizers"])
    out += ["", "| posterior | " + " | ".join(f"{o}: PUL % [95% CI] | {o}: u-FID (x) [95% CI] | {o}: confident | {o}: steps"
                                             for o in opts) + " |",
            "|---|" + "---|" * (4 * len(opts))]
    rows = {(r["posterior"], r["optimizer"]): r for r in d["rows"]}
    for kind in d["sigma"]:
        cells = [kind]
        for o in opts:
            r = rows[(kind, o)]
            cells += [_ci(r["pul"], r.get("pul_ci"), "{:.1f}"), _u_fid_ratio(r),
                      f"{r['confident_share_after']:.2f}", f"{r['steps']} ({r['stop'].replace('_', ' ')})"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + (f"\n\nConfident share before: {d['rows'][0]['confident_share_before']:.2f}. "
                             f"Notebook {d['wall_time_s'] / 60:.0f} min, written {d['written']}.\n")


def _per_class(items, shown=(1, 8, 0), names=None) -> str:
    """Benchmark rows grouped by (model, data, entry, stop ratio), the ``shown`` classes side by side: PUL [95%
    interval] and u-FID ratio per cell, the other classes' mean, and the relearning ratio over the classes shown.
    ``items``: (model, data, entry, stop ratio, class, row, relearning ratio or None); ``names``: class names,
    shown in the header where given."""
    groups: dict = {}
    for kind, data, entry, ratio, c, row, rel in items:
        groups.setdefault((kind, data, entry, ratio), {})[c] = (row, rel)
    head = [f"class {c}" + (f" ({names[c].split(',')[0]})" if names and names[c] != str(c) else "") for c in shown]
    out = ["| model | data | entry | stop ratio | " + " | ".join(head) + " | other classes: mean PUL (n: range) | "
           f"relearning, classes {', '.join(map(str, shown))} (x pretrained's) |",
           "|---|---|---|---|" + "---|" * len(shown) + "---|---|"]
    order = {"uncond": 0, "cond": 1}
    for (kind, data, entry, ratio), by_c in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 2), g[0][1:])):
        cells, rels = [], []
        for c in shown:
            if c not in by_c:
                cells.append("—")
                continue
            r, rel = by_c[c]
            cells.append(f"{_ci(r['pul'], r.get('pul_ci'), '{:.1f}')}, {r['u_fid_ratio']:.2f}x")
            if rel is not None:
                rels.append(rel)
        more = [r["pul"] for c, (r, _) in sorted(by_c.items()) if c not in shown]
        cells.append(f"{sum(more) / len(more):.1f} ({len(more)}: {min(more):.1f} to {max(more):.1f})" if more else "—")
        rel_s = f"{min(rels):.2f}–{max(rels):.2f}" if len(rels) > 1 else (f"{rels[0]:.2f}" if rels else "—")
        out.append(f"| {kind} | {data} | `{entry}` | {ratio:g} | " + " | ".join(cells) + f" | {rel_s} |")
    return "\n".join(out)


def _benchmark_cached(folder: Path, dataset: str = "mnist", shown=(1, 8, 0),
                      run: str = "make run-all NOTEBOOKS=benchmark") -> str:
    """The rows an unfinished full run has kept so far (``vdu.results.RowCache`` files), as :func:`_per_class`."""
    rows, refs, damaged = [], {}, 0
    for f in sorted(folder.glob("*.json")):
        try:
            d = json.loads(f.read_text())
            spec, row = d["spec"], d["row"]
            if spec["entry"] == "pretrained-relearn":
                refs[spec["kind"], spec["c"]] = row["forget_share"]
            else:
                rows.append((spec, row, d.get("commit")))
        except (ValueError, KeyError, TypeError):
            damaged += 1
    items = []
    for spec, row, _ in rows:
        ratio = spec["extra"].get("stop_forget_ratio", spec["entry"].get("stop_forget_ratio",
                                                                        spec["loop"]["stop_forget_ratio"]))
        ref = refs.get((spec["kind"], spec["c"]))
        rel = row["relearn_forget_share"] / ref if row.get("relearn_forget_share") is not None and ref else None
        items.append((spec["kind"], row["data"], row["config"], ratio, spec["c"], row, rel))
    out = [_per_class(items, shown)]
    commits = sorted({c for _, _, c in rows if c})
    samples = sorted({r["n_samples"] for _, r, _ in rows if r.get("n_samples")})
    return "\n".join(out) + (
        f"\n\n_Cached rows of the unfinished full run (`results/{dataset}/benchmark.json` not written yet; "
        f"`{run}` resumes from "
        f"`results/{dataset}/rows/benchmark/`): {len(rows)} method rows "
        f"and {len(refs)} relearning reference{'' if len(refs) == 1 else 's'}"
        + (f"; {damaged} unreadable files skipped" if damaged else "") + ". Each cell: PUL % [95% paired-bootstrap "
        f"interval], u-FID ratio to the pretrained model"
        + (f"; {' / '.join(f'{n:,}' for n in samples)} samples per model" if samples else "")
        + f" (sampler and seed bank of `notebooks/params/benchmark-full.yaml`"
        + ("" if dataset == "mnist" else f" and `benchmark-{dataset}.yaml`") + "). "
        f"Computed at commit{'s' if len(commits) > 1 else ''} "
        f"{', '.join(commits) or 'unknown'}; a row's key includes the digest of the method and evaluation code, so "
        f"the full run reuses only rows of its own code. The class means and the at-target count come with the "
        f"full run._\n")


def _shown_classes(root: Path, dataset: str, d: dict | None) -> list[int]:
    """The (at most three) classes the per-class table shows: the first class every benchmark entry runs, then
    the subset's, from the results file, or, for files written before it recorded them and for cached rows, from
    the dataset's full profile."""
    if d is not None and d.get("classes"):
        first, subset = d["classes"]["first"], d["classes"]["subset"]
    else:
        from .notebook import _full_params
        p = _full_params(root if (root / "notebooks" / "params").is_dir() else REPO, "benchmark", dataset)
        first, subset = p["first_class"], p["subset"]
    return ([first] + [c for c in subset if c != first])[:3]      # the others go to the "other classes" column


def benchmark(root: Path, dataset: str = "mnist") -> str:
    d = _load(f"results/{dataset}/benchmark.json", root)
    run = "make run-all " + ("" if dataset == "mnist" else f"DATASETS={dataset} ") + "NOTEBOOKS=benchmark"
    if d is None:
        folder = root / f"results/{dataset}/rows/benchmark"
        if not folder.is_dir() or not any(folder.glob("*.json")):
            return f"_results/{dataset}/benchmark.json not written yet (`{run}`): no rows cached either._\n"
        return _benchmark_cached(folder, dataset, _shown_classes(root, dataset, None), run)
    ev, t = d["evaluation"], d["target"]
    out = ["| model | data | entry | classes | mean PUL % | forget share after | u-FID (x) | confident after | "
           "forget / retain NLL after (bits/dim) | relearning (x pretrained's) | steps | s | at target |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in d["summary"]:
        rel = "—" if s.get("relearn") is None else f"{s['relearn']:.2f}"
        nll = (f"{s['forget_nll_after']:.3f} / {s['retain_nll_after']:.3f}"
               if s.get("forget_nll_after") is not None and s.get("retain_nll_after") is not None else "—")
        out.append(f"| {s['model']} | {s['data']} | `{s['entry']}` | {s['classes']} | {s['pul']:.1f} | "
                   f"{s['forget_share']:.3f} | {s['u_fid_ratio']:.2f} | {s['confident']:.2f} (before "
                   f"{s['confident_before']:.2f}) | {nll} | {rel} | {s['steps']:.0f} | {s['unlearn_s']:.0f} | "
                   f"{s['at_target']} / {s['classes']} |")
    before = {}                   # the pretrained model's NLL on the same images, mean over the classes it ran
    for r in d["rows"]:
        if r.get("forget_nll_before") is not None and r.get("retain_nll_before") is not None:
            before.setdefault(r["model"], {})[r["forget_class"]] = (r["forget_nll_before"], r["retain_nll_before"])
    nll_before = "; ".join(f"{k} {sum(f for f, _ in v.values()) / len(v):.3f} / {sum(g for _, g in v.values()) / len(v):.3f}"
                           for k, v in before.items())
    items = []
    for r in d["rows"] + d.get("pareto", []):
        ratio = r.get("stop_forget_ratio", {**d["loop"], **d["entries"][r["config"]]}["stop_forget_ratio"])
        items.append((r["model"], r["data"], r["config"], ratio, r["forget_class"], r, r.get("relearn_vs_pretrained")))
    return "\n".join(out) + (
        "\n\nPer class and strength (stop ratio), each cell PUL % [95% paired-bootstrap interval], u-FID ratio:\n\n"
        + _per_class(items, _shown_classes(root, dataset, d), (d.get("classes") or {}).get("names")) +
        "\n\nMeans over the classes each entry ran; every row with its 95% intervals is in the results file. "
        + (f"NLL: the bound in bits/dim on held-out forget / retain images (pretrained model, mean over its classes: "
           f"{nll_before}). " if nll_before else "")
        + f"{ev['samples']:,} samples per model ({ev['sampler']}, seed bank {ev['seed_bank']}). At target: rows whose "
        f"whole interval meets PUL >= {t['pul']:g}% and u-FID <= {t['u_fid_ratio']:g}x. Relearning: the forget share "
        f"after fine-tuning on {d['relearn']['images']} forget images for {d['relearn']['steps']} steps, over the "
        f"pretrained model's after the same attack (1: no resistance). {d['machine']}, notebook "
        f"{d['notebook_wall_s'] / 60:.0f} min ({d['rows_from_cache']} rows from earlier sessions), written "
        f"{d['written']}.\n")


def base_models(root: Path) -> str:
    """The CIFAR-10 and Tiny ImageNet base DDPMs, from their cards (``checkpoints/<dataset>/ddpm/card.json``)."""
    out = ["| model | training | train wall (machine) | samples | confident [95%] | bar | class shares "
           "| domain FID | bits/dim | bar met |", "|---|---|---|---|---|---|---|---|---|---|"]
    missing, notes = [], set()
    for ds in ("cifar10", "tinyimagenet"):
        c = _load(f"checkpoints/{ds}/ddpm/card.json", root)
        if c is None:
            missing.append(ds)
            continue
        m, cfg = c["metrics"], c.get("train_config") or {}
        bar, bpd = m["quality_bar"], m["bits_per_dim"]
        need = bar["confident_min"]
        steps = f"{c['train_steps']:,} x {cfg['batch_size']} steps" if c.get("train_steps") and cfg else "?"
        if c.get("total_steps") and c.get("train_steps") and c["total_steps"] != c["train_steps"]:
            steps = f"{c['total_steps']:,} x {cfg['batch_size']} steps ({c['train_steps']:,} in its last run, from --init)"
        if cfg and not c.get("train_finished", True):
            steps += f" of {cfg['steps']:,} planned (unfinished)"
        wall = f"{c['train_wall_s'] / 3600:.2f} h ({c.get('train_device') or '?'})" if c.get("train_wall_s") else "?"
        ci = m.get("confident_share_ci95_wilson")
        conf = f"{m['confident_share']:.1%}" + (f" [{ci[0]:.1%}, {ci[1]:.1%}]" if ci else "")
        shares = m["class_shares"]
        failed = [k for k in ("confident_share", "class_shares") if not bar[k + "_ok"]]
        out.append(
            f"| `checkpoints/{ds}/ddpm` | {steps} | {wall} | {m['samples']['n']:,}, {m['samples']['sampler']} | "
            f"{conf} | >= {need:.1%} | {min(shares):.1%}-{max(shares):.1%} | {m['domain_fid']:.2f} | "
            f"{bpd['mean']:.3f} ± {bpd['sem']:.3f} | {'yes' if bar['met'] else 'no (' + ', '.join(failed) + ')'} |")
        notes.add(f"{bpd['images']} test images, t-terms {bpd['t_terms']}")
    if len(out) == 2:
        return "_No base models for " + " or ".join(missing) + " yet (`checkpoints/<dataset>/ddpm/card.json`)._\n"
    return "\n".join(out) + (f"\n\n_No base model for {' or '.join(missing)} yet._" if missing else "") + (
        "\n\n_From the cards (`python -m vdu card`). Confident: evaluator max-probability >= 0.9, Wilson interval. "
        "Bar: every class at 5-15% and a confident share of at least half the evaluator's on real test images. "
        f"Bits/dim: NLL bound on {'; or on '.join(sorted(notes))} (the card says which)._\n")


TABLES = {"benchmark": benchmark,
          "benchmark_cifar10": lambda root: benchmark(root, "cifar10"),
          "benchmark_tinyimagenet": lambda root: benchmark(root, "tinyimagenet"),
          "duality": duality, "constrained": constrained, "data": data, "evaluation": evaluation,
          "vdu": vdu_classes, "posteriors": posteriors, "base_models": base_models}


def render(text: str, root: Path = REPO) -> str:
    """``text`` with every report block replaced by its table."""
    def sub(m):
        name = m.group("name")
        if name not in TABLES:
            raise ValueError(f"README block report:{name} has no table; known: {sorted(TABLES)}")
        return m.group(1) + TABLES[name](root) + m.group(4)
    return BLOCK.sub(sub, text)


def main(check: bool = False, readme: Path | None = None, root: Path = REPO) -> int:
    readme = readme or root / "README.md"
    old = readme.read_text()
    new = render(old, root)
    if check:
        if new != old:
            print(f"{readme} is out of date with results/: run `python -m vdu report`")
            return 1
        print(f"{readme} tables match results/")
        return 0
    if new != old:
        tmp = readme.with_suffix(".md.tmp")
        tmp.write_text(new)
        tmp.replace(readme)
    print(f"{readme}: {len(BLOCK.findall(new))} tables from results/")
    return 0
