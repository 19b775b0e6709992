#!/usr/bin/env python
"""zmqfork benchmarks: ``python benchmarks/run.py`` (full, several minutes) or ``--quick`` (CI smoke, < 1 min).

Sections (``--only`` takes a comma-separated subset):

- ``percall``  send+recv and REQ/REP per-call cost of each alternative;
- ``forkcost`` fork() latency, parent side and child start, with 0..1000 live tcp sockets;
- ``rebuild``  the child's first send on an inherited proxy against a hand-made rebuild;
- ``chain``    the fork chain under ``ulimit -n 1024``;
- ``detect``   which alternative works after os.fork / libc fork / raw clone;
- ``fdtrack``  what descriptor tracking costs: a hooked call, and the child's cleanup;
- ``prefork``  a master with M sockets forks N workers: time to the last worker's first message.

Prints the tables, writes JSON (default benchmarks/results/latest.json) and
the same tables as Markdown (benchmarks/results/latest.md; ``--markdown PATH``
to write it elsewhere, e.g. benchmarks/RESULTS.md).  Timings are reported,
never asserted: the exit status is non-zero only if a section itself crashed.
An alternative that fails to deliver shows as "broken".
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import ALT_LABEL, ALTERNATIVES, PERCALL_ALTERNATIVES, environment, fmt_cell, fmt_ns  # noqa: E402

SECTIONS = ("percall", "forkcost", "rebuild", "chain", "detect", "fdtrack", "prefork")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    def line(cells: List[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def _ratio(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _spread(s: Dict[str, float], fmt: str = "{:.0f}") -> str:
    """A figure over a few runs: the median and, where the runs differ, [min–max]."""
    if not s:
        return "-"
    median, low, high = (fmt.format(round(s[k], 9) + 0.0) for k in ("median", "min", "max"))  # no "-0.00"
    return median if low == high else f"{median} [{low}–{high}]"


# ---- targets ------------------------------------------------------------------------------


def _cleanup_rows(add: Callable[[str, Optional[float], str, Optional[bool], str], None], n: str,
                  case: Dict[str, Any]) -> None:
    """The target table's rows for the child's descriptor cleanup at ``n`` sockets, against both floors."""
    z, raw = case["zmqfork"], case["raw"]
    per_fd = z.get("cleanup_per_fd", {})
    for key, floor_name in (("close_loop_per_fd", "plain C close() loop"),
                            ("check_loop_per_fd", "its checks in a plain C loop")):
        floor = raw.get(key, {})
        r = per_fd["median"] / floor["median"] if per_fd.get("median") and floor.get("median") else None
        failed = raw.get("floor_failures")
        add(f"fork cost, {n} sockets, cleanup per descriptor / {floor_name}", r, "reported", None,
            f"{_ratio(r)} ({fmt_ns(per_fd.get('median'))} vs {fmt_ns(floor.get('median'))} per descriptor; "
            f"zmqfork closed {z.get('closed', '?')}, the floor {raw.get('libzmq_fds', '?')})"
            + (f"; {failed} floor runs failed" if failed else ""))


def targets(res: Dict[str, Any], quick: bool) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = []

    def add(name: str, value: Optional[float], limit: str, met: Optional[bool], text: str) -> None:
        status = "n/a" if met is None else ("met" if met else "missed")
        out.append({"target": name, "value": value, "limit": limit, "status": status, "text": text})

    pc = res.get("percall", {}).get("cases", {}).get("pushpull-inproc-1B")
    if pc:
        z, p = pc["alternatives"].get("zmqfork", {}), pc["alternatives"].get("pidcheck", {})
        r = z.get("ratio_to_raw")
        add("per-call 1 B inproc send+recv, zmqfork / raw", r, "<= 1.00", None if r is None else r <= 1.00,
            f"{_ratio(r)} ({fmt_ns(z.get('median'))} vs {fmt_ns(pc['alternatives']['raw'].get('median'))})")
        sp = p["median"] / z["median"] if z.get("median") and p.get("median") else None
        add("per-call 1 B inproc, pid-check / zmqfork (speed-up)", sp, ">= 1.30", None if sp is None else sp >= 1.30,
            f"{_ratio(sp)} ({fmt_ns(p.get('median'))} vs {fmt_ns(z.get('median'))})")
        pa = pc["alternatives"].get("patched", {})
        r = pa.get("ratio_to_raw")
        add("per-call 1 B inproc, zmqfork via patch() (import zmq) / raw", r, "<= 1.00", None if r is None else r <= 1.00,
            f"{_ratio(r)} ({fmt_ns(pa.get('median'))} vs {fmt_ns(pc['alternatives']['raw'].get('median'))})")
        cf = pc["alternatives"].get("checkfree", {})
        r = z["median"] / cf["median"] if z.get("median") and cf.get("median") else None
        add("per-call 1 B inproc, zmqfork / check-free subclass (the check's cost)", r, "<= 1.10",
            None if r is None else r <= 1.10, f"{_ratio(r)} ({fmt_ns(z.get('median'))} vs {fmt_ns(cf.get('median'))})")
    fc = res.get("forkcost", {}).get("cases", {}).get("100")
    if fc:
        for key, label in (("parent", "parent fork() latency"), ("child", "child start")):
            r = fc["zmqfork"][key].get("ratio_to_raw")
            add(f"fork cost, 100 sockets, {label}, zmqfork / without", r, "<= 1.05",
                None if r is None else r <= 1.05,
                f"{_ratio(r)} ({fmt_ns(fc['zmqfork'][key].get('median'))} vs {fmt_ns(fc['raw'][key].get('median'))})")
        _cleanup_rows(add, "100", fc)
    fc = res.get("forkcost", {}).get("cases", {}).get("1000")
    if fc:
        z, raw = fc["zmqfork"], fc["raw"]
        r = z["child"].get("ratio_to_raw")
        add("fork cost, 1000 sockets, child start, zmqfork / without", r, "reported", None,
            f"{_ratio(r)} ({fmt_ns(z['child'].get('median'))} vs {fmt_ns(raw['child'].get('median'))})")
        rest = z.get("child_rest", {})
        r = rest.get("ratio_to_raw")
        add("fork cost, 1000 sockets, child start without the descriptor cleanup, zmqfork / without", r, "<= 1.05",
            None if r is None else r <= 1.05,
            f"{_ratio(r)} ({fmt_ns(rest.get('median'))} vs {fmt_ns(raw['child'].get('median'))})")
        _cleanup_rows(add, "1000", fc)
    rb = res.get("rebuild", {}).get("modes")
    if rb:
        r = rb["zmqfork"]["first_send"].get("ratio_to_hand")
        ok = None if r is None or rb["zmqfork"]["failures"] else r <= 1.2
        add("rebuild: child's first send, zmqfork / by hand", r, "<= 1.20", ok,
            f"{_ratio(r)} ({fmt_ns(rb['zmqfork']['first_send'].get('median'))} vs "
            f"{fmt_ns(rb['hand']['first_send'].get('median'))})"
            + (f"; {rb['zmqfork']['failures']} failed" if rb["zmqfork"]["failures"] else ""))
        r = rb["zmqfork"]["from_fork"].get("ratio_to_hand")
        ok = None if r is None or rb["zmqfork"]["failures"] else r <= 1.1
        add("rebuild: child's first send from the fork, zmqfork / by hand", r, "<= 1.10", ok,
            f"{_ratio(r)} ({fmt_ns(rb['zmqfork']['from_fork'].get('median'))} vs "
            f"{fmt_ns(rb['hand']['from_fork'].get('median'))})")
    ch = res.get("chain", {})
    if ch.get("alternatives"):
        z = ch["alternatives"].get("zmqfork", {})
        g = z.get("generations_completed") or {}
        gens = g.get("min")  # every run must get there
        cap = ch["cap"]
        met = None if gens is None else g["n"] == ch["repeats"] and gens >= (cap + 1 if quick else 4097)
        failed = ch["repeats"] - g.get("n", 0)
        txt = (f"{gens} generations in the shortest of {g.get('n', 0)} runs (median {g.get('median', 0):.0f})"
               + (f"; {failed} runs failed" if failed else "")
               + (f" (quick run: cap {cap}, target is 4096 in the full run)" if quick else ""))
        add("fork chain under ulimit -n 1024, zmqfork generations", gens, ">= 4096", met, txt)
    return out


# ---- rendering ----------------------------------------------------------------------------


def _fdtrack_parts(ft: Dict[str, Any]) -> List[str]:
    """Section 6: the hooked call's overhead and the child's cleanup, hooks on vs off."""
    rows = []
    w, sc = ft["wrapper"], ft["socket_cycle"]
    names = {"t_loop_close_bad": "wrapper alone: close(-1) (EBADF) in a C loop",
             "t_loop_eventfd_close": "wrapper alone: eventfd + close in a C loop"}
    if "error" in w:
        rows.append(["wrapper alone", "", "error", w["error"][:80], ""])
    else:
        for loop, c in w["loops"].items():
            rows.append([names[loop], str(c["hooked_calls"]), fmt_cell(c["on"]), fmt_cell(c["off"]),
                         fmt_cell(c["per_call"])])
    if "error" in sc:
        rows.append(["libzmq: zmq_socket + zmq_close", "", "error", sc["error"][:80], ""])
    else:
        rows.append(["libzmq: zmq_socket + zmq_close (CPU time, all threads)", str(sc["hooked_calls"]),
                     fmt_cell(sc["on"]), fmt_cell(sc["off"]), fmt_cell(sc["per_call"])])
    parts = ["## 6. Descriptor tracking cost (hooks on vs off)", "",
             "Hooked call: ns per operation. 'Off' is an unhooked copy of the same object (wrapper alone) or "
             "`ZMQFORK_DISABLE=fdtrack` in a worker of the same shape (libzmq); 'per hooked call' is the median "
             "[interquartile range] of the per-repetition differences on − off, divided by the hooked calls per "
             "operation (for libzmq counted with strace -f: the mailbox's eventfd on the calling thread, its "
             "close on the reaper)."
             + ("" if "error" in w else f" Wrapper: {w['repetitions']} repetitions of {w['iterations']} iterations "
                f"after {w['warmup']} warm-up.")
             + ("" if "error" in sc else f" libzmq: {sc['repetitions']} repetitions of {sc['batch']} cycles after "
                f"{sc['warmup']} warm-up; a socket adds {sc['on']['tracked_per_socket']:g} tracked descriptor, "
                f"{sc['on']['tracked_left_after_close']} left after closing."), "",
             _table(["operation", "hooked calls", "hooks on", "hooks off", "per hooked call"], rows), ""]
    cl = ft["cleanup"]
    if "error" in cl:
        return parts + [f"Child cleanup: error {cl['error'][:200]}", ""]
    rows = []
    for n, row in cl["cases"].items():
        on, off = row["on"], row["off"]
        shape = [f"{on['fds']} ({on['tracked']})", ",".join(map(str, on["closed"])),
                 f"{','.join(map(str, on['child_fds']))} / {','.join(map(str, off['child_fds']))}"]
        for key, label in (("child_ns", "child start (wall)"), ("child_cpu_ns", "child's CPU time")):
            rows.append([n, label] + shape + [fmt_cell(on[key]), fmt_cell(off[key]), fmt_cell(row["difference"][key]),
                                              fmt_cell(row["per_fd"][key])])
    failed = [f"{n} sockets: {row['on']['failures']} on, {row['off']['failures']} off"
              for n, row in cl["cases"].items() if row["on"]["failures"] or row["off"]["failures"]]
    return parts + [
        "Child cleanup: os.fork() with N PUSH sockets connected over tcp; child start is the parent's stamp "
        "before fork() to the child's first instruction (the atfork child handler, which closes the tracked "
        "descriptors, runs inside fork()); the child's CPU time at that instruction leaves out the parent's "
        f"side of fork() and scheduling. {cl['rounds']} interleaved worker rounds x {cl['forks_per_worker']} "
        f"forks ({cl['warmup_forks']} warm-up forks per worker discarded); on − off and per closed descriptor "
        "are the median [interquartile range] over rounds of the difference of that round's medians.", "",
        _table(["sockets", "measure", "parent's fds (tracked)", "closed in child", "child's fds, on / off",
                "hooks on", "hooks off", "on − off", "per closed descriptor"], rows), ""] + (
        [f"Forks whose child did not report: {'; '.join(failed)}.", ""] if failed else [])


def _prefork_parts(pf: Dict[str, Any]) -> List[str]:
    """Section 7: the prefork server's start-up, per (workers, sockets), ratios to raw pyzmq with a hand-made setup."""
    measures = (("received", "last message received"), ("sent", "last worker's send returned"),
                ("forked", "master's fork loop"))
    rows = []
    for case in pf["cases"].values():
        row = case["alternatives"]
        lost = " / ".join(f"{row[alt]['not_delivered']} ({row[alt]['failed_workers']})" for alt in ALTERNATIVES)
        for i, (key, label) in enumerate(measures):
            cells = []
            for alt in ALTERNATIVES:
                c = row[alt]
                if c[key]:
                    cells.append(f"{fmt_cell(c[key])} {_ratio(c[key].get('ratio_to_raw'))}")
                else:
                    cells.append("broken" + (f" ({c['errors'][0][:60]})" if c["errors"] else ""))
            rows.append([str(case["workers"]), str(case["sockets"]), label] + cells + [lost if i == 0 else ""])
    labels = ["raw pyzmq + setup by hand"] + [ALT_LABEL[a] for a in ALTERNATIVES[1:]]
    return ["## 7. Prefork server start-up (a master with M sockets forks N workers; ratio to raw pyzmq + "
            "setup by hand)", "",
            "Each worker sends one message on an inherited socket (raw pyzmq: on a Context + PUSH + connect it "
            "makes by hand) and stays up until all have been received. Times from the master's stamp before its "
            f"first fork; {pf['rounds']} interleaved master rounds x {pf['bursts_per_master']} bursts of N forks "
            f"({pf['warmup_bursts']} warm-up burst per master discarded); a burst that lost a message is not "
            "timed; 'not delivered' counts the messages of every burst, per alternative in the order of the "
            "columns. The register_at_fork proxy rebuilds all M sockets in every worker.", "",
            _table(["workers", "sockets", "measure"] + labels + ["not delivered (workers failed)"], rows), ""]


def render(result: Dict[str, Any]) -> str:
    env = result["environment"]
    parts = [
        f"# zmqfork benchmarks ({'quick' if result['quick'] else 'full'} run)",
        "",
        f"Date: {result['date']}  ",
        f"Machine: {env.get('cpu_model', '?')}, {env.get('cpus')} CPUs, {env.get('system')} {env.get('kernel')} "
        f"{env.get('machine')}, {env.get('glibc')}  ",
        f"Versions: Python {env.get('python')}, pyzmq {env.get('pyzmq')}, libzmq {env.get('libzmq')}, "
        f"zmqfork {env.get('zmqfork')}  ",
        f"zmqfork source: commit {env.get('git_commit')}, {env.get('zmqfork_tree')}  ",
        f"zmqfork detection: `{env.get('zmqfork_detection')}`  ",
        f"zmqfork bytecode: {env.get('zmqfork_bytecode', '?')}  ",
        f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s); load average at start "
        f"{' '.join(env.get('loadavg_at_start', []))}, at end {' '.join(env.get('loadavg_at_end', []))} "
        "(other work shared the machine when above ~1)",
        "",
        "Cells: median [interquartile range] over interleaved repetitions after warm-up; "
        "ratios are of medians.",
        "",
    ]
    res = result["sections"]
    if result.get("targets"):
        parts += ["## Targets", "",
                  _table(["target", "limit", "measured", "status"],
                         [[t["target"], t["limit"], t["text"], t["status"]] for t in result["targets"]]), ""]
    labels = [ALT_LABEL[a] for a in ALTERNATIVES]
    if "percall" in res and "cases" in res["percall"]:
        pc = res["percall"]
        rows = []
        for case, row in pc["cases"].items():
            cells = []
            for alt in PERCALL_ALTERNATIVES:
                c = row["alternatives"].get(alt, {})
                if "broken" in c:
                    cells.append(f"broken ({c['broken'][:40]})")
                else:
                    cells.append(f"{fmt_cell(c)} {_ratio(c.get('ratio_to_raw'))}")
            z, p = row["alternatives"].get("zmqfork", {}), row["alternatives"].get("pidcheck", {})
            sp = p["median"] / z["median"] if z.get("median") and p.get("median") else None
            rows.append([case] + cells + [_ratio(sp)])
        parts += ["## 1. Per call (ns per operation; ratio to raw pyzmq)", "",
                  f"{pc['repetitions']} repetitions after {pc['warmup']} warm-up; iterations per repetition "
                  f"{pc['iterations']}. An operation is one send+recv pair (PUSH/PULL) or one REQ/REP round trip.", "",
                  _table(["case"] + [ALT_LABEL[a] for a in PERCALL_ALTERNATIVES] + ["pid-check / zmqfork"], rows), ""]
    if "forkcost" in res and "cases" in res["forkcost"]:
        fc = res["forkcost"]
        rows = []
        for n, row in fc["cases"].items():
            for key, label in (("parent", "parent fork() latency"), ("child", "child start")):
                cells = []
                for alt in ALTERNATIVES:
                    c = row[alt]
                    cells.append("error" if not c[key] else f"{fmt_cell(c[key])} {_ratio(c[key].get('ratio_to_raw'))}")
                shape = (f"{row['raw'].get('fds', '?')} / {row['zmqfork'].get('fds', '?')} fds, "
                         f"{row['raw'].get('rss_kib', 0) // 1024} / {row['zmqfork'].get('rss_kib', 0) // 1024} MiB, "
                         f"{row['raw'].get('mappings', '?')} / {row['zmqfork'].get('mappings', '?')} maps")
                rows.append([n, label, shape] + cells)
            z, raw = row["zmqfork"], row["raw"]
            if z.get("child_rest"):
                blank = [""] * (len(ALTERNATIVES) - 1)
                rows.append([n, "child start without the descriptor cleanup", ""] + blank
                            + [f"{fmt_cell(z['child_rest'])} {_ratio(z['child_rest'].get('ratio_to_raw'))}"])
                floors = "; ".join(f"{name}: {fmt_cell(raw[key]) if raw.get(key) else 'n/a'}"
                                   for key, name in (("close_loop_per_fd", "plain C close() loop"),
                                                     ("check_loop_per_fd", "its checks in C")))
                floors += f" ({raw.get('libzmq_fds', '?')} descriptors" + (
                    f"; {raw['floor_failures']} runs failed)" if raw.get("floor_failures") else ")")
                rows.append([n, f"descriptor cleanup ({z.get('closed', '?')} closed); per descriptor", "",
                             floors] + blank[1:]
                            + [f"{fmt_cell(z['cleanup'])}; {fmt_cell(z['cleanup_per_fd'])}"])
        parts += ["## 2. Fork cost (os.fork with N live tcp sockets; ratio to the same process without zmqfork)", "",
                  f"{fc['rounds']} interleaved worker rounds x {fc['forks_per_worker']} forks "
                  f"({fc['warmup_forks']} warm-up forks per worker discarded). "
                  "'raw pyzmq' = the process without zmqfork (never imported); shape = open descriptors, RSS and "
                  "memory mappings before forking. The register_at_fork proxy rebuilds every socket in its hook, "
                  "before the child's first instruction. Each worker and its children run on one CPU (unpinned, "
                  "a fork also flushes the TLB of the CPU where a libzmq thread last ran, and a worker's fork() "
                  "took ~210 or ~480 us at random, for every mode). zmqfork's child start is also split: its "
                  "descriptor cleanup (timed inside the atfork handler: an fstat() per socket, an fcntl() mark check "
                  "per eventfd or epoll, close_range() per run of numbers) and everything else. The raw child, on "
                  "alternate forks, runs over the same descriptors a plain C loop of close() (the floor of any "
                  "cleanup) or the cleanup's checks in a plain C loop without its table (fstat() per socket, "
                  "fcntl() per eventfd or epoll, close_range() per run: the floor of a cleanup that never closes "
                  "a descriptor the application put at one of the numbers).", "",
                  _table(["sockets", "measure", "shape (without / with zmqfork)"] + labels, rows), ""]
    if "rebuild" in res and "modes" in res["rebuild"]:
        rb = res["rebuild"]
        names = {"hand": "by hand (new Context, PUSH, connect, send)"}
        rows = []
        for mode, c in rb["modes"].items():
            rows.append([names.get(mode, ALT_LABEL.get(mode, mode) + " (send on inherited)"),
                         f"{fmt_cell(c['first_send'])} {_ratio(c['first_send'].get('ratio_to_hand'))}",
                         f"{fmt_cell(c['from_fork'])} {_ratio(c['from_fork'].get('ratio_to_hand'))}",
                         str(c["failures"]) + (f" {c['failure_examples']}" if c["failures"] else "")])
        parts += ["## 3. Rebuild latency in the child (ratio to by hand)", "",
                  f"{rb['rounds']} interleaved worker rounds x {rb['reps_per_worker']} forks "
                  f"({rb['warmup']} warm-up). 'first send' is timed in the child from its first instruction; "
                  "'from fork' from the parent's stamp before fork() (includes atfork handlers and hooks).", "",
                  _table(["child does", "first send", "from fork", "not delivered"], rows), ""]
        if rb.get("profile"):
            rows = []
            for mode, steps in rb["profile"].items():
                label = "by hand" if mode == "hand" else ALT_LABEL.get(mode, mode)
                total = sum(step["ns"].get("median", 0) for step in steps)
                for step in steps:
                    rows.append([label, step["step"], fmt_cell(step["ns"]), f"{step['faults'].get('median', 0):.0f}"])
                rows.append([label, "sum of the steps' medians", fmt_ns(total),
                             f"{sum(step['faults'].get('median', 0) for step in steps):.0f}"])
            parts += ["Where the first send's time goes: more children take the same steps one at a time, each timed "
                      "and with the minor page faults it took (getrusage). Every first write to a page in a forked "
                      "child is a copy-on-write fault.", "",
                      _table(["child", "step", "time", "page faults"], rows), ""]
    if "chain" in res and "alternatives" in res["chain"]:
        ch = res["chain"]
        rows = []
        for alt in ALTERNATIVES:
            c = ch["alternatives"].get(alt, {})
            runs = len(c.get("runs", []))
            if not c.get("generations_completed"):
                rows.append([ALT_LABEL[alt], f"0 of {runs}", "error", "", "", "", "", "", "",
                             "; ".join(c.get("errors", []))[:80]])
                continue
            mem = "-" if not c["mappings_per_generation"] else (
                f"{_spread(c['mappings_per_generation'], '{:+.2f}')} maps, "
                f"{_spread(c['rss_kib_per_generation'], '{:+.1f}')} KiB RSS"
                + (f" (first {ch['early_generations']}: {_spread(c['rss_kib_per_generation_early'], '{:+.1f}')} KiB"
                   + (f", of {c['rss_kib_per_generation_early']['n']}" if c["rss_kib_per_generation_early"]["n"] < runs
                      else "") + ")"
                   if c.get("rss_kib_per_generation_early") and ch.get("early_generations") else ""))
            fps = _spread(c["forks_per_second"]) + (
                f" ({_spread(c['forks_per_second_first'])} -> {_spread(c['forks_per_second_last'])})"
                if c["forks_per_second_first"] and c["forks_per_second_last"] else "")
            stopped = "; ".join(f"{n}x {why}" for why, n in c["stop_reasons"].items())
            rows.append([ALT_LABEL[alt], f"{c['generations_completed']['n']} of {runs}",
                         _spread(c["generations_completed"]), _spread(c["delivered"]),
                         f"{_spread(c['fds_first'])} -> {_spread(c['fds_last'])}",
                         _spread(c["fds_per_generation"], "{:+.2f}"), mem, fps,
                         _spread(c["elapsed_s"], "{:.1f}"),
                         stopped[:120] + ("; errors: " + "; ".join(c["errors"])[:60] if c["errors"] else "")])
        parts += [f"## 4. Fork chain under ulimit -n {ch['fd_limit']} (cap {ch['cap']} generations, "
                  f"timeout {ch['timeout_s']:.0f} s per run)", "",
                  f"Each alternative's chain ran {ch['repeats']} times, the runs interleaved in rotating order; "
                  "cells are the median over the runs and, where they differ, [min–max]. fds/gen and memory/gen "
                  "are least-squares slopes, memory over the forked generations (sampled every 64), and RSS also "
                  f"over the first {ch.get('early_generations', '?')} alone, from the runs that reached them (the "
                  "chains stop at very different lengths; 'of n' where some did not); forks/s is overall (first "
                  "eighth of the chain -> last eighth); 'stopped' counts the runs by why they stopped.", "",
                  _table(["alternative", "runs", "generations", "delivered", "fds first -> last", "fds/gen",
                          "memory/gen", "forks/s", "seconds", "stopped"], rows), ""]
    if "detect" in res and "matrix" in res["detect"]:
        m = res["detect"]["matrix"]
        rows = []
        for alt in ALTERNATIVES:
            cells = []
            for kind in ("os", "libc", "raw"):
                c = m[alt][kind]
                cells.append(c["verdict"] + (f" ({c['detail']})" if c["verdict"] != "works" and c["detail"] else ""))
            rows.append([ALT_LABEL[alt]] + cells)
        parts += ["## 5. Detection matrix (REQ/REP round trip on the inherited socket, run, not written down)", "",
                  _table(["alternative", "os.fork()", "libc fork() via ctypes", "raw clone syscall"], rows), ""]
    if "fdtrack" in res:
        parts += _fdtrack_parts(res["fdtrack"])
    if "prefork" in res and "cases" in res["prefork"]:
        parts += _prefork_parts(res["prefork"])
    for name, err in result.get("errors", {}).items():
        parts += [f"Section {name} crashed: {err.splitlines()[-1]}", ""]
    return "\n".join(parts)


def _precompile_zmqfork() -> str:
    """Compile zmqfork's modules to bytecode, as ``pip install`` does, and say so.

    An editable install under ``PYTHONDONTWRITEBYTECODE`` compiles every module
    from source in every process, and the compiler's garbage stays in the heap:
    about 1 MiB more for each fork to copy, which no installed zmqfork has.
    """
    import compileall

    spec = importlib.util.find_spec("zmqfork")
    if spec is None or not spec.submodule_search_locations:
        return "zmqfork not found"
    where = list(spec.submodule_search_locations)[0]
    ok = compileall.compile_dir(where, quiet=1, maxlevels=0)
    return f"precompiled in {where}" if ok else f"could not precompile {where}: modules compiled at import"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller counts, fewer repetitions (< 1 min)")
    p.add_argument("--json", default=os.path.join(HERE, "results", "latest.json"), help="JSON output path")
    p.add_argument("--markdown", default=os.path.join(HERE, "results", "latest.md"), help="Markdown output path")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    a = p.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    t0 = time.monotonic()
    precompiled = _precompile_zmqfork()
    result: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": a.quick,
        "command": "python benchmarks/run.py" + (" --quick" if a.quick else "")
        + ("" if only == list(SECTIONS) else f" --only {','.join(only)}"),
        "environment": {**environment(), "zmqfork_bytecode": precompiled},
        "sections": {},
        "errors": {},
    }
    runners: Dict[str, Callable[[bool, Callable[[str], None]], Dict[str, Any]]] = {}
    for name in only:
        module = __import__(name)
        runners[name] = module.run
    for name in SECTIONS:
        if name not in runners:
            continue
        _log(f"== {name}")
        t = time.monotonic()
        try:
            result["sections"][name] = runners[name](a.quick, _log)
        except Exception:
            result["errors"][name] = traceback.format_exc()
            _log(result["errors"][name])
        _log(f"   ({time.monotonic() - t:.1f} s)")
    result["elapsed_s"] = time.monotonic() - t0
    try:
        result["environment"]["loadavg_at_end"] = open("/proc/loadavg").read().split()[:3]
    except OSError:
        pass
    result["targets"] = targets(result["sections"], a.quick)
    text = render(result)
    print(text)
    for path, data in ((a.json, json.dumps(result, indent=1)), (a.markdown, text + "\n")):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(data)
    _log(f"wrote {a.json} and {a.markdown}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
