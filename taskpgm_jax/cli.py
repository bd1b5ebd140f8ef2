"""The `taskpgm` command.

    taskpgm run CONFIG.yaml [--run-dir DIR] [--dry-run [--devices N]] [key=value ...]
    taskpgm report RUN_DIR
    taskpgm mixture solve --affinity S.npy [--names names.txt] [--method exact] [--budget N]
                          [--out DIR [--overwrite]]
    taskpgm data fetch bigbench [--cache-dir DIR]
    taskpgm bench divergence|divergence_tiles|mrf|model|adapters|probe [benchmark options]

Errors are one line naming the option, config key or file and what to do; `--debug` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import typing
from pathlib import Path

from taskpgm_jax._atomic import write_text_atomic
from taskpgm_jax.config import SolveMethod

BENCHMARKS = ("divergence", "divergence_tiles", "mrf", "model", "adapters", "probe")
DATASETS = ("bigbench",)
METHODS = typing.get_args(SolveMethod)  # the solvers of mrf.solve, as the run config types them


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _read_names(path: str | None, count: int) -> list[str]:
    if path is None:
        return [f"task_{i}" for i in range(count)]
    try:
        names = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise CliError(f"--names: cannot read {path} ({e.strerror}).") from None
    if len(names) != count:
        raise CliError(f"--names: {path} has {len(names)} names but the affinity matrix has "
                       f"{count} rows; give one task name per line.")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CliError(f"--names: {path} repeats {dup}; give each task its own name.")
    return names


def _load_affinity(path: str):
    import numpy as np

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CliError(f"--affinity: cannot read {path} ({e.strerror}).") from None
    # np.load reads anything else as a pickle and then advises allow_pickle, which is not the fix.
    if magic != b"\x93NUMPY":
        raise CliError(f"--affinity: {path} is not a .npy file; save the matrix with "
                       "numpy.save(path, S).")
    try:
        matrix = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CliError(f"--affinity: cannot read {path} as a .npy array ({e}).") from None
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise CliError(f"--affinity: {path} holds shape {matrix.shape}; expected a square "
                       "[T, T] matrix.")
    if matrix.shape[0] == 0:  # no tasks to weight (and the default lam, 2T, would be 0)
        raise CliError(f"--affinity: {path} holds a 0 x 0 matrix; give a [T, T] affinity of at "
                       "least one task.")
    return matrix


# Every file a solve may write; what marks a directory as holding a solve.
EXPORTS = ("mixture.json", "levanter.json", "seqio.json", "counts.json", "open_instruct.json")
# The messages of `potentials` name its parameters; the user typed these options.
_OPTION_OF = {"beta": "--beta", "lam": "--lam"}


def _check_out(out: Path, overwrite: bool) -> list[str]:
    """The exports of an earlier solve in `out` (refused without --overwrite: they would be
    replaced, or outlive this solve beside its files)."""
    if out.exists() and not out.is_dir():
        raise CliError(f"--out: {out} is a file; give a directory.")
    earlier = [name for name in EXPORTS if (out / name).exists()]
    if earlier and not overwrite:
        raise CliError(f"--out: {out} already holds {', '.join(earlier)} from another solve; "
                       "pass --overwrite to replace them, or choose another --out.")
    return earlier


def mixture_solve(args) -> int:
    """Solve the MRF on a user's affinity matrix and write the mixture and its exports."""
    import numpy as np

    from taskpgm_jax.mrf import Mixture, potentials, solve

    if args.budget is not None and args.budget < 0:
        raise CliError(f"--budget: must be >= 0 (training examples to split), got {args.budget}.")
    matrix = _load_affinity(args.affinity)
    names = _read_names(args.names, matrix.shape[0])
    # 2T: beta / lam = 1 / (2T), halfway from uniform (1 / T) to the inverse-affinity weights.
    lam = float(args.lam) if args.lam is not None else 2.0 * matrix.shape[0]
    try:
        pot = potentials(matrix, "centrality", beta=args.beta, lam=lam)
        sol = solve(pot, args.method)
    except ValueError as e:
        message = str(e)
        name = message.partition(":")[0]
        if name in _OPTION_OF:
            message = _OPTION_OF[name] + message[len(name):]
        elif name == "affinity":
            message = f"--affinity: {args.affinity}" + message[len(name):]
        raise CliError(message) from None
    mixture = Mixture.from_solution(names, sol, unit="examples", beta=args.beta, lam=lam,
                                    affinity=str(args.affinity))
    # Every export is built before the first file is written: an error leaves nothing behind.
    files = {"mixture.json": mixture.to_json(),
             "levanter.json": json.dumps(mixture.to_levanter(), indent=2),
             "seqio.json": json.dumps(mixture.to_seqio(), indent=2)}
    if args.budget is not None:
        files["counts.json"] = json.dumps(mixture.to_counts(args.budget), indent=2)
        # open-instruct reads a value <= 1 as a fraction of that dataset: only counts say what
        # the weights mean there.
        try:
            files["open_instruct.json"] = json.dumps(mixture.to_open_instruct(args.budget),
                                                     indent=2)
        except ValueError as e:
            raise CliError(str(e).replace("budget:", "--budget:", 1)) from None
    out = Path(args.out)
    earlier = _check_out(out, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    # mixture.json goes first and comes back last: an interrupt never leaves a mixture.json
    # beside exports of another solve (a rerun with --overwrite finishes the job).
    if "mixture.json" in earlier:
        (out / "mixture.json").unlink()
    for name in earlier:
        if name not in files:
            (out / name).unlink()
    for name, text in sorted(files.items(), key=lambda item: item[0] == "mixture.json"):
        write_text_atomic(out / name, text)
    weights = np.asarray(mixture.weights)
    order = np.argsort(-weights)
    print(f"{args.method}: energy {float(sol.energy):.6g}, KKT residual "
          f"{float(sol.kkt_residual):.3g}, {int(sol.iterations)} iterations, "
          f"{int(np.sum(weights > 0))} of {len(names)} tasks with weight > 0")
    for i in order[:min(10, len(order))]:
        print(f"  {weights[i]:.4f}  {names[i]}")
    removed = [name for name in earlier if name not in files]
    print(f"wrote {out}/mixture.json and the exports beside it"
          + (f"; removed {', '.join(removed)} of the earlier solve" if removed else ""))
    return 0


def run(args) -> int:
    """The whole pipeline (or, with --dry-run, its plan) for one config."""
    from taskpgm_jax.config import load_config
    from taskpgm_jax.distributed import maybe_initialize

    if args.devices is not None and not args.dry_run:
        raise CliError("--devices: only with --dry-run (a real run uses every device it sees).")
    if args.devices is not None and args.devices < 1:
        raise CliError(f"--devices: must be >= 1, got {args.devices}.")
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from taskpgm_jax.pipeline.dryrun import dry_run, format_dry_run

        num_devices = args.devices
        if num_devices is None:
            import jax

            maybe_initialize()  # on a multi-host slice: every chip of the slice, not one host's
            num_devices = jax.device_count()
        report = dry_run(cfg, num_devices=num_devices)
        print(format_dry_run(report))
        return 0 if report.fits else 3
    maybe_initialize()
    from taskpgm_jax.pipeline.run import run_pipeline

    run_dir = Path(args.run_dir) if args.run_dir else Path("runs") / cfg.name
    results = run_pipeline(cfg, run_dir, progress=not args.no_progress)
    print(f"results: {run_dir / 'results.json'}; report: {run_dir / 'report.md'}")
    for method, entry in results["methods"].items():
        # One seed has no spread to show: its std is stored as 0.0, which is not a measured 0.
        n = entry.get("n", len(entry.get("seeds", [])))
        spread = "(1 seed)" if n == 1 else f"+- {entry['std']:.4f}"
        print(f"  {method:18s} {results['metric']} {entry['mean']:.4f} {spread}")
    return 0


def report(args) -> int:
    from taskpgm_jax.pipeline.report import write_report

    if not Path(args.run_dir).is_dir():
        raise CliError(f"report: {args.run_dir} is not a directory; give a run directory "
                       "written by `taskpgm run`.")
    print(f"wrote {write_report(Path(args.run_dir))}")
    return 0


def data_fetch(args, rest) -> int:
    from taskpgm_jax.data.sources import bigbench

    if args.dataset not in DATASETS:
        raise CliError(f"data fetch: unknown dataset {args.dataset!r}; available: "
                       f"{', '.join(DATASETS)}.")
    return bigbench.main(rest)


def bench(args, rest) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise CliError(f"bench: {script} not found; the benchmarks ship with the source "
                       "checkout (pip install -e .), not with a wheel.")
    sys.argv = [str(script), *rest]
    sys.path.insert(0, str(script.parent))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the scripts end with sys.exit(main())
        return int(e.code or 0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskpgm", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run (or resume) an experiment config end to end")
    run_p.add_argument("config", help="experiment YAML, e.g. experiments/configs/demo.yaml")
    # default=[]: without one argparse counts a "*" positional as required in its usage error.
    run_p.add_argument("overrides", nargs="*", default=[], metavar="key=value",
                       help="dotted config overrides, e.g. single_task.steps=50 seeds=[0]")
    run_p.add_argument("--run-dir", help="run directory (default runs/<name>); reusing one "
                       "skips finished stages")
    run_p.add_argument("--dry-run", action="store_true", help="validate, size the models "
                       "abstractly and estimate memory per device per stage; compute nothing")
    run_p.add_argument("--devices", type=int, metavar="N", help="with --dry-run: plan for N "
                       "devices (e.g. 16 for a TPU v4-32 slice) instead of the ones this machine "
                       "sees")
    run_p.add_argument("--no-progress", action="store_true", help="no progress bars")
    run_p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks")

    report_p = sub.add_parser("report", help="(re)write report.md and figures of a run")
    report_p.add_argument("run_dir")

    mixture = sub.add_parser("mixture", help="mixture weights from an affinity matrix")
    msub = mixture.add_subparsers(dest="action", required=True)
    solve_p = msub.add_parser("solve", help="solve the MRF on your own affinity matrix")
    solve_p.add_argument("--affinity", required=True, help="[T, T] affinity matrix (.npy)")
    solve_p.add_argument("--names", help="task names, one per line (default task_0 ...)")
    solve_p.add_argument("--method", default="exact", choices=METHODS)
    solve_p.add_argument("--beta", type=float, default=1.0, help="unary weight (> 0)")
    solve_p.add_argument("--lam", type=float, default=None,
                         help="pairwise weight (default 2T; at beta/lam = 1/T the centrality "
                         "mixture is exactly uniform)")
    solve_p.add_argument("--budget", type=int, default=None,
                         help="also write integer example counts summing to this budget")
    solve_p.add_argument("--out", default="mixture", help="output directory")
    solve_p.add_argument("--overwrite", action="store_true",
                         help="replace the files of an earlier solve in --out (and remove its "
                         "exports this solve does not write)")

    data = sub.add_parser("data", help="task data")
    dsub = data.add_subparsers(dest="action", required=True)
    fetch = dsub.add_parser("fetch", help="download a dataset once into its cache",
                            add_help=False)
    # Without add_help, `NAME --help` reaches the script; a bare --help is answered in `main`.
    fetch.add_argument("dataset", nargs="?", help="one of: " + ", ".join(DATASETS))

    bench_p = sub.add_parser("bench", help="run a benchmark script", add_help=False)
    bench_p.add_argument("name", nargs="?", choices=BENCHMARKS)
    return parser


def _passthrough_usage(args, rest) -> int | None:
    """`taskpgm bench --help` / `taskpgm data fetch --help` (no name): list the names and how
    to see one's options (exit 0); no name at all is a usage error. None when a name is given."""
    command, names, what = (("bench", BENCHMARKS, "benchmark") if args.command == "bench"
                            else ("data fetch", DATASETS, "dataset"))
    if (args.name if args.command == "bench" else args.dataset) is not None:
        return None
    usage = (f"usage: taskpgm {command} {{{','.join(names)}}} [options]\n"
             f"  taskpgm {command} NAME --help lists the options of that {what}")
    if any(r in ("-h", "--help") for r in rest):
        print(usage)
        return 0
    print(f"{usage}\ntaskpgm {command}: error: give a {what} name", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    passthrough = args.command in ("bench", "data")
    if args.command == "run":
        # Overrides may come after options (argparse stops filling the positional list there).
        extra = [r for r in rest if not r.startswith("-")]
        args.overrides = [*args.overrides, *extra]
        rest = [r for r in rest if r not in extra]
    if rest and not passthrough:
        parser.error(f"unrecognised arguments: {' '.join(rest)}")
    if passthrough and (status := _passthrough_usage(args, rest)) is not None:
        return status
    try:
        if args.command == "run":
            return run(args)
        if args.command == "report":
            return report(args)
        if args.command == "mixture":
            return mixture_solve(args)
        if args.command == "data":
            return data_fetch(args, rest)
        return bench(args, rest)
    except CliError as e:
        if args.debug:
            raise
        print(f"taskpgm: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"taskpgm: error: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("taskpgm: interrupted; run the same command again to resume (finished stages "
              "are kept, training resumes from its last checkpoint)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
