"""docs/active_learning.md and its learning-curve plot from a bench_active_learning.py JSON."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

METRICS = (("dice", "test Dice (mean of lung and infection)"), ("lung_dice", "lung Dice 3D"),
           ("infection_dice", "infection Dice 3D (positive scans)"),
           ("false_infection_ml", "false infection mL (infection-free scans)"),
           ("scan_call_accuracy", "scan call accuracy"), ("real_lung_dice", "lung Dice, real test scan(s)"))
NOTES = Path(__file__).resolve().parent / "al_notes.md"  # the analysis written after a campaign (included verbatim)


def _retrained(run: dict, metric: str) -> list:
    """Per round, the latest retrain's test value whether the gate served it or kept it (the served
    model's where no retrain ran): what the corrections taught, apart from the gate's decisions."""
    vals, last = [], run["rounds"][0]["test"].get(metric)
    for r in run["rounds"]:
        if r.get("test_published"):
            last = r["test_published"].get(metric)
        elif (r.get("gate") or {}).get("decision") in ("promoted", "forced") or r["round"] == 0:
            last = r["test"].get(metric)
        vals.append((r["corrections"], last))
    return vals


def curves(out: dict, metric: str, retrained: bool = False) -> dict:
    """-> {strategy: (corrections [n], values [seeds, n])}; a run that stopped early is padded with its last value.
    ``retrained``: the latest retrain's values (``_retrained``) instead of the served model's."""
    by = {}
    for run in out["runs"]:
        by.setdefault(run["strategy"], []).append(
            _retrained(run, metric) if retrained else [(r["corrections"], r["test"].get(metric)) for r in run["rounds"]])
    res = {}
    for strat, runs in by.items():
        n = max(len(r) for r in runs)
        xs = [c for c, _ in max(runs, key=len)]
        vals = np.array([[(r[i] if i < len(r) else r[-1])[1] for i in range(n)] for r in runs], dtype=float)
        res[strat] = (xs, vals)
    return res


def saving(out: dict, strategy: str, baseline: str = "random", metric: str = "dice"):
    """Share of ``baseline``'s corrections ``strategy`` needs to reach ``baseline``'s final mean ``metric``."""
    c = curves(out, metric)
    if strategy not in c or baseline not in c:
        return None
    bx, bv = c[baseline]
    target = float(np.nanmean(bv[:, -1]))
    sx, sv = c[strategy]
    mean = np.nanmean(sv, axis=0)
    for x, m in zip(sx, mean):
        if m >= target - 1e-9:
            return {"target": round(target, 4), "corrections": x, "baseline_corrections": bx[-1],
                    "share": round(x / bx[-1], 3) if bx[-1] else None}
    return {"target": round(target, 4), "corrections": None, "baseline_corrections": bx[-1], "share": None}


def paired(out: dict, strategy: str, baseline: str = "random", metric: str = "dice"):
    """Seed by seed (the same pools and initial model), ``strategy`` minus ``baseline`` at each number of
    corrections: -> (corrections [n], differences [seeds both ran, n]) or None. A difference of means hides
    how much of it is the draw; paired differences show it."""
    by = {}
    for run in out["runs"]:
        by.setdefault((run["strategy"], run["seed"]), [(r["corrections"], r["test"].get(metric))
                                                        for r in run["rounds"]])
    seeds = sorted(s for (st, s) in by if st == strategy and (baseline, s) in by)
    if not seeds:
        return None
    n = min(min(len(by[(strategy, s)]), len(by[(baseline, s)])) for s in seeds)
    xs = [c for c, _ in by[(strategy, seeds[0])][:n]]
    def values(strat):  # None (a metric not measured) becomes nan
        return np.array([[v for _, v in by[(strat, s)][:n]] for s in seeds], dtype=float)

    return xs, values(strategy) - values(baseline)


def plot(out: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ("dice", "lung_dice", "infection_dice", "false_infection_ml")
    # the served model (what a radiologist gets), and, dashed, the latest retrain whether served or not (what the
    # corrections taught it, apart from the gate)
    retrained = any(r.get("test_published") for run in out["runs"] for r in run["rounds"])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    for ax, metric in zip(axes, panels):
        latest = curves(out, metric, True) if retrained else {}
        for k, (strat, (xs, vals)) in enumerate(sorted(curves(out, metric).items())):
            mean = np.nanmean(vals, axis=0)
            line, = ax.plot(xs, mean, marker="o", color=f"C{k}", label=f"{strat} served (n={len(vals)})")
            ax.fill_between(xs, np.nanmin(vals, axis=0), np.nanmax(vals, axis=0), color=line.get_color(), alpha=0.15)
            if strat in latest:
                lx, lv = latest[strat]
                ax.plot(lx, np.nanmean(lv, axis=0), ls="--", marker=".", color=line.get_color(), alpha=0.8,
                        label=f"{strat} latest retrain")
        ax.set_xlabel("corrections submitted")
        ax.set_title(dict(METRICS)[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Simulated annotation campaign through the Hybrid CT server (served model: mean, band = min-max over "
                 "seeds; dashed: the latest retrain, served or not)", fontsize=9)
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _fmt(vals) -> str:
    v = np.asarray(vals, dtype=float)
    v = v[~np.isnan(v)]
    if not v.size:
        return "–"
    return f"{v.mean():.3f} [{v.min():.3f}–{v.max():.3f}]" if v.size > 1 else f"{v.mean():.3f}"


def _no_gate(retrain) -> str:
    err = (retrain or {}).get("error") or ""
    if "nothing to train on" in err:
        return "no retrain (the only label is a validation image)"
    return f"error: {err[:50]}" if err else "no retrain"


def _pending_rule(out: dict) -> bool:
    """Did this campaign's server publish retrains ``pending`` (judged on the next correction, 2026-12-07 evening)?"""
    return any((r.get("gate") or {}).get("decision") == "pending" or r.get("judged")
               for run in out["runs"] for r in run["rounds"])


TRAIN_KEYS = ("max_epochs", "learning_rate", "max_minutes", "from_shipped", "replay_slices", "new_share",
              "gate_replay_share", "val_split", "promote_metrics", "promote_tolerance")


def _train_defaults(out: dict) -> str:
    """The retrain defaults the campaign's servers reported (``train_config``, recorded since 2026-12-07 22:00)."""
    cfg = next((r["train_config"] for r in out["runs"] if r.get("train_config")), None)
    return ", ".join(f"`{k}` {cfg[k]}" for k in TRAIN_KEYS if k in cfg) if cfg else ""


def gate_rows(out: dict) -> list:
    """One row per gate decision: a retrain judged on held-out slices when it ended, or a retrain published
    ``pending`` and judged at the start of the next round on that round's correction (``judged``; its test Dice
    "if served" is the one measured in the round it was published)."""
    rows = []
    for run in out["runs"]:
        prev = run["rounds"][0]["test"]
        published = {}  # version -> its test values, measured in the round it was published (kept or pending)
        for r in run["rounds"][1:]:
            g, j = r.get("gate") or {}, r.get("judged") or {}
            base = {"strategy": run["strategy"], "seed": run["seed"], "round": r["round"], "before": prev.get("dice"),
                    "after": r["test"].get("dice"), "fi_before": prev.get("false_infection_ml"),
                    "fi_after": r["test"].get("false_infection_ml"), "round_s": r.get("round_s"),
                    "scoring_s": r.get("scoring_s"), "breakdown": r.get("breakdown") or {},
                    "epoch_s": r.get("epoch_s") or [], "test_s": r.get("test_s"),
                    "budget_hit": ((r.get("retrain") or {}).get("time_budget") or {}).get("hit"),
                    "epochs": (r.get("retrain") or {}).get("epoch"),
                    "train_slices": ((r.get("retrain") or {}).get("train") or {}).get("slices"),
                    "picks": ", ".join(f"{p['id']} ({p.get('source') or p['kind']})" for p in r["picks"])}
            if j.get("decision") in ("promoted", "kept", "forced"):
                cand = published.get(j.get("candidate")) or {}
                rows.append(dict(base, decision=j["decision"], judged=True, candidate=j.get("candidate"),
                                 on=f"{len(j.get('judged_on') or [])} unseen img, {j.get('val_slices')} sl.",
                                 new=(j.get("new") or {}).get("score"), served=(j.get("served") or {}).get("score"),
                                 published=cand.get("dice") if j["decision"] == "kept" else None,
                                 fi_published=cand.get("false_infection_ml") if j["decision"] == "kept" else None,
                                 decision_s=r.get("decision_s")))
            decision = g.get("decision") or _no_gate(r.get("retrain"))
            if decision != "pending" and j.get("decision") in ("promoted", "forced") and rows and rows[-1]["judged"]:
                # the judged version was served only until this round's own retrain replaced it: its own test values
                cand = published.get(j.get("candidate")) or {}
                rows[-1].update(after=cand.get("dice"), fi_after=cand.get("false_infection_ml"))
                base.update(before=cand.get("dice"), fi_before=cand.get("false_infection_ml"))
            if decision != "pending" or not j:
                on = "–" if g.get("val_on_training_set") is None else (
                    "train" if g.get("val_on_training_set") else f"{g.get('val_images')} img" + (
                        f" + {g['val_replay_slices']} replay" if g.get("val_replay_slices") is not None else ""))
                if decision == "pending":
                    on = "nothing held out"
                rows.append(dict(base, decision=decision, judged=False, candidate=None, on=on,
                                 new=(g.get("new") or {}).get("score"), served=(g.get("served") or {}).get("score"),
                                 published=(r.get("test_published") or {}).get("dice"),
                                 fi_published=(r.get("test_published") or {}).get("false_infection_ml"),
                                 decision_s=r.get("round_s") if decision != "pending" else None))
            else:  # the round's own retrain waits for the next correction: shown on its judged row's line
                rows[-1]["decision"] += "; new pending"
            pub = (r.get("retrain") or {}).get("published_version")
            if pub and r.get("test_published"):
                published[pub] = r["test_published"]
            prev = r["test"]
    return rows


def _gate_summary(rows: list) -> list:
    """All strategies together: how often the gate promoted, what each promotion changed on the test pool,
    and (where the run scored kept versions too) the gains it blocked."""
    ran = [r for r in rows if not r["decision"].startswith(("no retrain", "error", "pending"))]
    prom = [r for r in ran if r["decision"].startswith(("promoted", "forced")) and r["before"] is not None]
    deltas = [r["after"] - r["before"] for r in prom]
    lower = [d for d in deltas if d < 0]
    out = [f"- all strategies: the gate promoted {len(prom)} of {len(ran)} retrains; "
           f"{len(lower)} of those lowered the test Dice"
           + (f" (by {-max(lower):.4f} to {-min(lower):.4f})" if lower else "")]
    if deltas:
        out[-1] += (f"; test-Dice change per promotion: mean {np.mean(deltas):+.4f}, median {np.median(deltas):+.4f}, "
                    f"min {min(deltas):+.4f}, max {max(deltas):+.4f}, sum {sum(deltas):+.4f}")
    kept = [r for r in ran if r["decision"].startswith("kept") and r["published"] is not None and r["before"] is not None]
    if kept:
        kd = [r["published"] - r["before"] for r in kept]
        up, down = sum(d > 0 for d in kd), sum(d < 0 for d in kd)
        out[-1] += (f"; of the {len(kept)} kept retrains, {up} would have raised the test Dice"
                    + (f" (by up to {max(kd):+.4f})" if up else "") + f" and {down} lowered it"
                    + (f" (down to {min(kd):+.4f})" if down else ""))
    out[-1] += "."
    return out


def _initial(out: dict) -> dict:
    return next(iter(out["pools"].values()), {}).get("initial_model") or {}


def _real_txt(st: dict) -> str:
    pool = st.get("pool_real") or ["imlab_id001", "nsclc_lung1_001"]
    test = st.get("test_real") or ["imlab_id002"]
    k = st.get("real_max_slices", 48)
    return (f"{' and '.join(pool)} in the pool, {' and '.join(test)} in the test pool; no infection; "
            + (f"at most {k} slices kept" if k else "every slice kept, whole scans"))


def _rel(path: str) -> str:
    repo = Path(__file__).resolve().parents[1]
    return os.path.relpath(path, repo) if str(path).startswith(str(repo)) else str(path)


def _network(st: dict, out: dict) -> str:
    if st.get("initial") == "shipped":
        info = _initial(out)
        net = info.get("net") or {}
        return (f"the shipped network (`{info.get('version')}`, {net.get('in_size')}x{net.get('in_size')} input, "
                f"{net.get('levels')} levels, T={net.get('time_steps')} spiking; replay sample: "
                f"{'`' + _rel(info['replay']) + '` (`hybrid-ct replay`, as scripts/serve.sh builds it)' if info.get('replay') else 'none in the package, so none on the server'}"
                "), started as the README's server starts it. Read the numbers as what a lab gets per round on "
                "this machine")
    return ("tiny network (the test architecture, 64x64). Read the numbers as what this loop does at this scale, "
            "not as what a lab gets with the shipped model")


def _r3(v):
    return round(v, 4) if isinstance(v, float) else v


def _time_summary(rows: list, pending: bool = False) -> list:
    """Where a round's time went (the retrain's own stats): the process starting, training epochs (each with its
    validation pass over the training slices), the gate scoring new and served model + publishing; and the
    benchmark's test scoring, which is not part of a lab's round."""
    bs = [r["breakdown"] for r in rows if r["breakdown"]]
    if not bs:
        return []
    med = lambda k: np.median([b[k] for b in bs])  # noqa: E731
    out = [f"- where a round's time went (median over the {len(bs)} retrains): {med('to_start_s'):.0f} s from the "
           f"correction to the retrain process running, {med('train_s'):.0f} s training (epochs, each with its "
           f"validation pass{'; the judgement of the pending retrain at its start included' if pending else ''}), "
           f"{med('gate_publish_s'):.0f} s gate (new and served model scored{', only with held-out data' if pending else ''})"
           " + publishing"]
    eps = [e for r in rows for e in r["epoch_s"] if e]
    if eps:
        out[-1] += f"; an epoch took a median {np.median(eps):.0f} s (max {max(eps):.0f} s)"
    ts = [r["test_s"] for r in rows if r["test_s"]]
    if ts:
        out[-1] += (f"; scoring a new model on the test pool (the benchmark's measurement, outside the round) took a "
                    f"median {np.median(ts):.0f} s")
    out[-1] += "."
    return out


def _paired_lines(out: dict, strategies: list) -> list:
    """The target "at least as good as random at every round", seed by seed: test Dice minus random's."""
    rows = {st: paired(out, st) for st in strategies if st != "random"}
    rows = {st: v for st, v in rows.items() if v is not None and v[1].shape[1] > 1}
    if not rows:
        return []
    xs = next(iter(rows.values()))[0]
    lines = ["", "Against random, seed by seed (same pools and initial model): served test Dice minus random's, mean "
             "[min–max] over the seeds both ran.", "", "| strategy | seeds | " + " | ".join(
                 f"{c} corr." for c in xs[1:]) + " |", "|---|---|" + "---|" * (len(xs) - 1)]
    verdict = []
    for st, (sx, d) in rows.items():
        lines.append(f"| {st} | {d.shape[0]} | " + " | ".join(
            (f"{np.nanmean(d[:, i]):+.3f} [{np.nanmin(d[:, i]):+.3f}–{np.nanmax(d[:, i]):+.3f}]"
             if d.shape[0] > 1 else f"{d[0, i]:+.3f}") for i in range(1, d.shape[1])) + " |")
        below = [sx[i] for i in range(1, d.shape[1]) if np.nanmean(d[:, i]) < -1e-9]
        worse = int(np.sum(d[:, 1:] < -1e-9))
        verdict.append(f"- `{st}` at least as good as random at every round (mean over seeds): "
                       + ("yes" if not below else f"no, below after {', '.join(map(str, below))} correction(s)")
                       + f"; below random in {worse} of {d[:, 1:].size} (seed, round) pairs.")
    return lines + [""] + verdict


def write(out: dict, doc: str, png: str, notes=None) -> None:
    plot(out, png)
    st, m = out["settings"], out["machine"]
    strategies = st["strategies"]
    shipped = st.get("initial") == "shipped"
    done = sum(len(r["rounds"]) - 1 for r in out["runs"])
    partial = [r for r in out["runs"] if r.get("complete") is False]
    lines = ["# Active learning, measured: a simulated annotation campaign through the server"
             + (" (the shipped network)" if shipped else ""), "",
             f"**{'A SMALL campaign' if len(st['seeds']) < 3 or st['rounds'] < 8 else 'Campaign'}**: "
             f"{len(strategies)} strategies x {len(st['seeds'])} seed(s) x {st['rounds']} round(s) of "
             f"{st['per_round']} correction(s), pool of {st['pool']} phantoms"
             f"{' + real scans' if st['real'] else ''}, test pool of {st['test']} phantoms"
             f"{' + real scans' if st['real'] else ''}, phantom shape {tuple(st['shape'])}; {_network(st, out)}.", ""]
    if len(st["seeds"]) == 1:
        lines += ["**One seed: this is not a strategy comparison.** Each strategy is one draw: a difference between "
                  "strategies here says nothing about which is better (on the tiny network, docs/active_learning_tiny.md, "
                  "the spread between seeds was as wide as the differences between strategies).", ""]
    if partial:
        lines += [f"**Cut short**: {len(partial)} run(s) did not finish all rounds ("
                  + ", ".join(f"`{r['strategy']}` seed {r['seed']}: {len(r['rounds']) - 1} of {st['rounds']}"
                              for r in partial) + f"); {done} rounds in all are reported.", ""]
    ran = {(r["strategy"], r["seed"]) for r in out["runs"]}
    missing = [f"`{strat}` seed {seed}" for seed in st["seeds"] for strat in strategies if (strat, seed) not in ran]
    if missing:
        lines += [f"**Not run yet**: {', '.join(missing)}. The command below, run again with the same `--workdir`, "
                  "reuses the finished runs and goes on with these; until then every mean and spread here is over "
                  "the seeds that ran.", ""]
    js = f"docs/{Path(doc).with_suffix('.json').name}"
    defaults = _train_defaults(out)
    replay_txt = ("no replay (the package ships none beside the checkpoint, so the lab's server has none: a retrain "
                  "trains on the corrected scans alone)" if shipped and not _initial(out).get("replay") else
                  "replay up to 256 slices of the initial model's training data")
    lines += ["Regenerate (writes the JSON, this page and the plot):", "", "```",
             *out.get("commands", [out["command"]]), "```", "",
             f"This page and the plot again from the JSON it wrote (kept as `{js}`): "
             f"`python benchmarks/bench_active_learning.py {'--initial shipped ' if shipped else ''}--report {js}`.", "",
             f"Run {out.get('started')} – {out.get('finished')} on {m['cpus']} CPU cores ({m.get('platform')}; "
             f"OMP_NUM_THREADS={m.get('omp_threads')}; load average (1, 5, 15 min) at start "
             f"{', '.join(f'{v:.1f}' for v in m.get('load_avg_at_start') or [])}"
             + (f", at the end {', '.join(f'{v:.1f}' for v in m['load_avg_at_end'])}" if m.get("load_avg_at_end") else "")
             + "; the campaign itself loads about 2: more means other jobs shared the machine, and its times are upper "
             "bounds). Retrain params of the "
             "server's auto-retrain: "
             f"`{st['auto_train_params']}` plus the seed (`{{}}`: the app's defaults"
             + (f", as the server's `/info` gave them: {defaults}). " if defaults else
                "; those of "
             f"{'2026-12-07 18:00' if _pending_rule(out) else '2026-12-07 13:00'}: 10 epochs "
             f"at lr 1e-3, 5 min bound, {replay_txt}, the corrected "
             "slices weighed to half of the training sample (`new_share` 0.5), the epoch picked on the training "
             + ("slices, the learning rate's cosine following the time budget, the gate on the held-out corrected "
                "images or, with none, pending until the next correction; `gate_replay_share` 0)."
                if _pending_rule(out) else
                "slices, the gate on the held-out corrected images or, with none, the training slices; "
                "`gate_replay_share` 0 is that default, named).")),
             "", "## How it works", "",
             "Each (strategy, seed) starts a fresh server exactly as the README does (`monailabel start_server --app "
             "apps/hybrid_ct`, via `tests/server_fixture.py`, 127.0.0.1, its own temp studies and model folders). "
             "The studies folder holds the unlabelled pool (truth hidden in the benchmark). Each round: the "
             "strategy is asked over HTTP (`POST /activelearning/<strategy>`; for `uncertainty` a `POST "
             "/scoring/uncertainty` first, as `auto_scoring` would after a model change), the pick's truth is "
             "submitted as the radiologist's correction with the request Slicer sends (`PUT /datastore/label"
             "?tag=final`, `label_info` lung 1 / infection 2), the app's auto-retrain (`auto_train_after` = "
             "corrections per round) and promotion gate run, and the served version (`GET /hybrid_ct/versions`) "
             "is scored on the test pool, which never enters the datastore, by running its checkpoint through "
             "`hybrid_ct.predict.Predictor` in the benchmark process (the class the server's infer task uses).",
             "", "Pool and test pool (per seed; the same for every strategy):", ""]
    for seed, p in out["pools"].items():
        desc = lambda d: ", ".join(f"{k} {v['scans']} ({v['positive']} positive)" for k, v in d.items())  # noqa: E731
        im = p["initial_model"]
        start = (f"the shipped checkpoint `{im.get('version')}` (sha256 {str(im.get('sha256'))[:12]}…)"
                 if im.get("kind") == "shipped" else
                 f"{im['epochs']} epochs on {im['phantoms']} plain phantoms (score {im['metric']})")
        sl = lambda d: sum(v["slices"] for v in d.values())  # noqa: E731
        lines.append(f"- seed {seed}: pool {desc(p['pool'])} ({sl(p['pool'])} slices); test {desc(p['test'])} "
                     f"({sl(p['test'])} slices); initial model {start}. {'; '.join(p['notes'])}")
    lines += ["", "Kinds (benchmarks/al_pools.py): `phantom` plain; `lowdose` + correlated noise 60–110 HU; `thick` "
              "slices averaged in pairs; `distractor` infection-free with a dependent posterior density gradient and "
              "calcified nodules; `real` real HU volumes with expert lung contours ("
              + _real_txt(st) + "); `lesions` those real scans with synthetic COVID-like lesions drawn into "
              "their lungs (exact masks as infection).", "",
              "## Learning curves", "", f"![learning curves]({os.path.relpath(png, Path(doc).parent)})", "",
              "| strategy | corrections | test Dice | lung Dice | infection Dice | false infection mL | scan call | "
              "real lung Dice |", "|---|---|---|---|---|---|---|---|"]
    for strat in strategies:
        cs = {k: curves(out, k).get(strat) for k, _ in METRICS}
        if not cs["dice"]:
            continue
        xs = cs["dice"][0]
        for i, x in enumerate(xs):
            lines.append(f"| {strat} | {x} | " + " | ".join(_fmt(cs[k][1][:, i]) if cs[k] else "–"
                                                             for k, _ in METRICS) + " |")
    lines += ["", "Mean [min–max] over seeds."]
    if any(r.get("test_published") for run in out["runs"] for r in run["rounds"]):
        lines += ["", "The latest retrain's test Dice, whether the gate served it or kept it (what the corrections "
                  "taught the model, apart from the gate):", "", "| strategy | " + " | ".join(
                      f"{c} corr." for c in curves(out, "dice", True)[strategies[0]][0]) + " |",
                  "|---|" + "---|" * len(curves(out, "dice", True)[strategies[0]][0])]
        rc = curves(out, "dice", True)
        for strat in strategies:
            if strat in rc:
                lines.append(f"| {strat} | " + " | ".join(_fmt(rc[strat][1][:, i]) for i in range(rc[strat][1].shape[1]))
                             + " |")
    lines += ["", "## Annotation saving", ""]
    if len(st["seeds"]) == 1:
        lines.append("One seed: what follows is one draw per strategy, not a measured saving.")
    for strat in strategies:
        if strat == "random":
            continue
        sv = saving(out, strat)
        if sv is None:
            continue
        start = float(np.nanmean(curves(out, "dice")["random"][1][:, 0]))
        if sv["target"] <= round(start, 4) + 1e-9:  # random ended where it began (target rounded to 4 places): nothing saved
            lines.append(f"- `{strat}`: nothing to compare: random's final mean test Dice {sv['target']} is not "
                         f"above the start ({start:.4f}).")
        elif sv["corrections"] is None:
            lines.append(f"- `{strat}` never reached random's final mean test Dice {sv['target']} within "
                         f"{sv['baseline_corrections']} corrections.")
        else:
            lines.append(f"- `{strat}` reached random's final mean test Dice {sv['target']} after {sv['corrections']} "
                         f"of random's {sv['baseline_corrections']} corrections: {100 * sv['share']:.0f} %.")
    lines += _paired_lines(out, strategies)
    rows = gate_rows(out)
    lines += ["", "## The promotion gate and time per round", ""]
    for strat in strategies:
        rs = [r for r in rows if r["strategy"] == strat]
        if not rs:
            continue
        promoted = [r for r in rs if r["decision"].startswith(("promoted", "forced"))]
        better = [r for r in promoted if r["after"] is not None and r["before"] is not None and r["after"] >= r["before"]]
        ran = [r for r in rs if not r["decision"].startswith(("no retrain", "pending"))]
        lines.append(f"- `{strat}`: {len(promoted)} of {len(ran)} retrains promoted ({len(rs)} rounds); {len(better)} of "
                     "those not worse on the test pool (test Dice).")
    lines += _gate_summary(rows)
    dtimes = [r["decision_s"] for r in rows if r.get("judged") and r.get("decision_s") is not None]
    if dtimes:
        lines.append(f"- time from a correction submitted to the pending retrain judged on it (served or kept): median "
                     f"{np.median(dtimes):.0f} s, max {max(dtimes):.0f} s; the correction itself reaches the served "
                     "model through the retrain that this round starts, judged on the next correction.")
    times = sorted({(r["strategy"], r["seed"], r["round"]): r["round_s"] for r in rows if r["round_s"] is not None}.values())
    if times:
        what = ("new retrain published, pending" if _pending_rule(out) else "new model served or kept")
        lines.append(f"- time per round (last correction submitted -> {what}): median "
                     f"{np.median(times):.0f} s, max {max(times):.0f} s on this machine"
                     + (f"; uncertainty scoring before a pick: median "
                        f"{np.median([r['scoring_s'] for r in rows if r['scoring_s']]):.0f} s"
                        if any(r["scoring_s"] for r in rows) else "") + ".")
    lines += _time_summary(rows, _pending_rule(out))
    lines += ["", "Gate scored on: held-out corrected images + held-out replay slices, or `train` (the training "
              "images: no held-out image and no replay yet; the rule before 2026-12-07 evening), or `N unseen img` "
              "(a retrain published pending, judged at the next round's start on its correction, which neither "
              "model had trained on). A kept retrain's test Dice (what serving it would have given) is measured "
              "too, in brackets.", "",
              "| strategy | seed | round | picked | gate | gate scored on | gate score new / served | "
              "test Dice before -> after | false infection mL before -> after | epochs (budget hit) | round s "
              "(start + train + gate) | test scoring s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        on = r["on"]
        tag = "pending" if r["decision"] == "pending" else "kept"
        after = f"{r['after']}" + (f" [{tag}: {r['published']}]" if r["published"] is not None else "")
        fi = f"{r['fi_before']} -> {r['fi_after']}" + (f" [{tag}: {r['fi_published']}]"
                                                        if r["fi_published"] is not None else "")
        b = r["breakdown"]
        parts = (f" ({b['to_start_s']:.0f} + {b['train_s']:.0f} + {b['gate_publish_s']:.0f})" if b else "")
        dec = (f"{r['candidate']} {r['decision']}" if r.get("candidate") else r["decision"])
        lines.append(f"| {r['strategy']} | {r['seed']} | {r['round']} | {r['picks']} | {dec} | {on} "
                     f"| {_r3(r['new']) if r['new'] is not None else '–'} / {_r3(r['served']) if r['served'] is not None else '–'} "
                     f"| {r['before']} -> {after} | {fi} "
                     f"| {r['epochs']} ({r['budget_hit']}) | {r['round_s']}{parts} | {r['test_s'] if r['test_s'] is not None else '–'} |")
    lines += ["", "## What each strategy picked", ""]
    for run in out["runs"]:
        picks = [f"{p['id']} ({p['kind']}{', +' if p['positive'] else ''})" for r in run["rounds"][1:] for p in r["picks"]]
        lines.append(f"- `{run['strategy']}` seed {run['seed']}: " + ", ".join(picks))
    notes = Path(notes) if notes else NOTES
    if notes.is_file():
        lines += ["", notes.read_text(encoding="utf-8").strip()]
    Path(doc).write_text("\n".join(lines) + "\n", encoding="utf-8")
