"""Format/FSR sweeps: the paper's grids, evaluated with shared calibration, resumable, sharded.

A sweep is a list of points (one configuration each). Phase 1 measures every point on a
validation subset; phase 2 measures on the full test split the points that honest
selection picks: for each global-FSR curve the FSR best on validation, and every point
whose FSRs come from calibration. Rows are written after each round (atomically), so an
interrupted sweep resumes where it stopped. Under ``torchrun`` each round is sharded across
processes and gathered on rank 0.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from logquant.config import QuantConfig
from logquant.convert import PreparedModel
from logquant.data import ImageDataset, Splits
from logquant.distributed import broadcast_object, gather_lists, init_distributed
from logquant.errors import LogquantError
from logquant.evaluate import evaluate
from logquant.formats import FAMILIES, family_format, parse_format
from logquant.io import (
    check_output_path,
    file_sha256,
    read_json,
    write_json_atomic,
    write_text_atomic,
)

SWEEP_VERSION = 2  # 2: no wall-clock column, so equal sweeps give identical files
ROWS_FILE = "sweep.csv"
MANIFEST_FILE = "manifest.json"
COLUMNS = ("id", "group", "scope", "quantized", "base", "bits", "conv_weights", "fc_weights",
           "acts", "fsr", "fsr_method", "split", "images", "top1", "top5")


class SweepError(LogquantError):
    """An invalid grid or output folder."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of a sweep, described by the format names it uses."""

    group: str  # float | acts-global | acts-calibrated | weights | weights+acts
    scope: str  # "conv" (conv layers only) or "conv+fc"
    conv_weights: str = "float"
    fc_weights: str = "float"
    acts: str = "float"  # with @fsrN for a global FSR
    method: str = "mse"  # FSR method for the parts without a fixed FSR

    @property
    def id(self) -> str:
        return (f"{self.group}|{self.scope}|w={self.conv_weights},{self.fc_weights}"
                f"|a={self.acts}|{self.method}")

    @property
    def varied(self) -> str:
        """The format this point is about: the activation format unless only weights vary."""
        return self.conv_weights if self.group == "weights" else self.acts

    def describe(self) -> dict[str, Any]:
        fmt = parse_format(self.varied)
        if fmt is None:
            base, bits, fsr = "float", "", ""
        else:
            base, bits, fsr = fmt.family, fmt.bits, "" if fmt.fsr is None else fmt.fsr
        quantized = {"float": "nothing", "acts-global": "activations",
                     "acts-calibrated": "activations", "weights": "weights",
                     "weights+acts": "weights+activations"}[self.group]
        fixed = fsr != "" and self.group == "acts-global"
        return {"id": self.id, "group": self.group, "scope": self.scope,
                "quantized": quantized, "base": base, "bits": bits,
                "conv_weights": self.conv_weights, "fc_weights": self.fc_weights,
                "acts": self.acts, "fsr": fsr,
                "fsr_method": "global" if fixed else (self.method if fmt else "")}

    def config(self, kinds: dict[str, str]) -> QuantConfig:
        """The configuration; scope "conv" leaves the inputs of fc layers in float."""
        overrides = {}
        if self.scope == "conv":
            overrides = {name: {"acts": "float"} for name, kind in kinds.items() if kind == "fc"}
        return QuantConfig(conv_weights=self.conv_weights, fc_weights=self.fc_weights,
                           acts=self.acts, weight_fsr=self.method, act_fsr=self.method,
                           overrides=overrides)


def paper_grid(fsr_range: tuple[int, int], method: str = "mse",
               act_bits: Iterable[int] = (3, 4, 5)) -> list[Point]:
    """The paper's grids plus the two obvious ways past base-2's resolution floor
    (base-sqrt2 activations, per-layer calibrated FSRs)."""
    lo, hi = fsr_range
    if lo > hi:
        raise SweepError(f"FSR range {lo}:{hi} is empty (min > max)")
    act_bits = tuple(act_bits)
    points = [Point("float", "conv+fc")]
    for scope in ("conv", "conv+fc"):
        for family in FAMILIES:
            for bits in act_bits:
                fmt = family_format(family, bits)
                for fsr in range(lo, hi + 1):
                    points.append(Point("acts-global", scope, acts=fmt.with_fsr(fsr).name,
                                        method=method))
                points.append(Point("acts-calibrated", scope, acts=fmt.name, method=method))
    for conv_bits, fc_bits in ((5, 4), (3, 3), (4, 4), (5, 5), (6, 6)):
        for family in FAMILIES:
            points.append(Point("weights", "conv+fc",
                                conv_weights=family_format(family, conv_bits).name,
                                fc_weights=family_format(family, fc_bits).name, method=method))
    for weights, acts in (("logsqrt2-5", "log4"), ("logsqrt2-4", "log3"), ("log4", "log3"),
                          ("logsqrt2-4", "logsqrt2-3"), ("lin4", "lin3"), ("lin8", "lin8")):
        points.append(Point("weights+acts", "conv+fc", conv_weights=weights,
                            fc_weights=weights, acts=acts, method=method))
    return points


def default_fsr_range(prepared: PreparedModel) -> tuple[int, int]:
    """Wide enough for every curve's peak and fall-off: from 5 below the smallest layer's
    covering FSR to 5 above the largest (where 3-bit log's 7 octaves drop the data)."""
    from logquant.calibrate import fsr_covering

    tops = [fsr_covering(s.max_abs) for n, s in prepared.act_stats.items()
            if n != prepared.first_layer]
    return min(tops) - 5, max(tops) + 5


# ----------------------------------------------------------------------------------------
# Selection


def selected_for_test(val_rows: list[dict]) -> list[str]:
    """Point ids to measure on the test split: the best-on-validation FSR of each global-FSR
    curve (ties: the larger FSR, less clipping), and every other point."""
    best: dict[tuple, dict] = {}
    chosen = []
    for row in val_rows:
        if row["group"] != "acts-global":
            chosen.append(row["id"])
            continue
        curve = (row["scope"], row["base"], int(row["bits"]))
        current = best.get(curve)
        if current is None or (float(row["top1"]), int(row["fsr"])) > (
                float(current["top1"]), int(current["fsr"])):
            best[curve] = row
    return chosen + [row["id"] for row in best.values()]


# ----------------------------------------------------------------------------------------
# Output folder: manifest, rows, resume


_FLOAT_COLUMNS = ("top1", "top5")
_INT_COLUMNS = ("bits", "fsr", "images")


def _typed(row: dict) -> dict:
    """A row read back from CSV with its numbers as numbers ('' stays '')."""
    row = dict(row)
    for key in _FLOAT_COLUMNS:
        row[key] = float(row[key])
    for key in _INT_COLUMNS:
        row[key] = int(row[key]) if row[key] != "" else ""
    return row


def read_rows(path: Path) -> list[dict]:
    """The rows of a sweep's CSV file (empty if there is none yet)."""
    if not path.is_file():
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(path.read_text())))
        if rows and set(rows[0]) != set(COLUMNS):
            raise ValueError(f"columns {sorted(rows[0])} are not a sweep's")
        return [_typed(row) for row in rows]
    except (OSError, csv.Error, ValueError, KeyError) as exc:
        raise SweepError(f"{path}: cannot read the rows of an earlier run ({exc}); use "
                         "--force or another --out") from None


def _write_rows(path: Path, rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def _visible_entries(out: Path) -> list[str]:
    """Names in ``out``, ours aside (lock, temporaries: hidden names)."""
    return sorted(p.name for p in out.iterdir()
                  if not p.name.startswith(".")) if out.is_dir() else []


def _foreign_entries(out: Path) -> list[str]:
    """Names in ``out`` (ours aside: lock, temporaries) when it is not a sweep's folder."""
    existing = _visible_entries(out)
    if not existing:
        return []
    try:
        previous = read_json(out / MANIFEST_FILE)
    except LogquantError:
        return existing
    return [] if isinstance(previous, dict) and "version" in previous else existing


def refuse_foreign_folder(out: Path, force: bool) -> None:
    """Before any work: a folder of other files than a sweep's is refused unless ``force``
    (whether an earlier sweep there is the same sweep is decided by ``open_output``)."""
    foreign = _foreign_entries(out)
    if foreign and not force:
        raise SweepError(f"--out {out}: holds other files ({', '.join(foreign[:3])}); pass "
                         "--force to overwrite, or choose another folder")


def open_output(out: Path, manifest: dict, force: bool) -> list[dict]:
    """Prepare ``out`` for this sweep; return the rows of an earlier run of the same sweep.

    A folder holding anything else (another sweep, unrelated files) is refused unless
    ``force``, which starts the sweep afresh there.
    """
    check_output_path(out, folder=True, foreign_ok=True)  # its contents are checked here
    existing = _visible_entries(out)
    if existing and not force:
        manifest_path = out / MANIFEST_FILE
        try:
            previous = read_json(manifest_path)
        except LogquantError:
            previous = None
        if previous != manifest:
            what = "another sweep" if previous else f"other files ({', '.join(existing[:3])})"
            raise SweepError(f"--out {out}: holds {what}; pass --force to overwrite, or "
                             "choose another folder")
        return read_rows(out / ROWS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    if force:
        for name in (ROWS_FILE, "sweep.json"):
            if (out / name).exists():
                (out / name).unlink()
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return []


# ----------------------------------------------------------------------------------------
# Running


@dataclasses.dataclass
class SweepSettings:
    val_size: int = 2000  # validation images per phase-1 evaluation
    batch_size: int = 500
    calib_batches: int = 4  # calibration batches (of batch_size) from the validation split
    device: str = "cpu"
    oracle: bool = False  # also measure every global-FSR point on the test split


def sweep_manifest(command: str, model_name: str, checkpoint: str | os.PathLike | None,
                   splits: Splits, settings: SweepSettings) -> dict[str, Any]:
    """What identifies a sweep's inputs (stored as ``manifest.json``): an output folder
    holding another manifest is another sweep, never resumed into."""
    from logquant.models import BUNDLED_WEIGHTS, REFERENCE_MODEL

    weights = checkpoint or (BUNDLED_WEIGHTS if model_name == REFERENCE_MODEL else None)
    return {"version": SWEEP_VERSION, "command": command, "model": model_name,
            "checkpoint_sha256": file_sha256(weights) if weights else None,
            "val_size": settings.val_size, "calib_batches": settings.calib_batches,
            "batch_size": settings.batch_size, "oracle": settings.oracle,
            "test_images": len(splits.test), "data_sha256": splits.fingerprint()}


def process_rank() -> int:
    """This process's rank under torchrun (0 when not distributed)."""
    return init_distributed()[0]


def prepare_sweep(model: torch.nn.Module, splits: Splits,
                  settings: SweepSettings) -> PreparedModel:
    """The calibrated model a sweep evaluates, on this process's device."""
    rank, world = init_distributed()
    device = torch.device(settings.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    model = model.to(device)
    return PreparedModel(model, splits.val.batches(settings.batch_size, device),
                         num_batches=settings.calib_batches, cache_weights=True)


def run_sweep(model: torch.nn.Module, splits: Splits, points: list[Point], out: Path,
              manifest: dict, settings: SweepSettings, *, force: bool = False,
              progress: bool = True, log: Callable[[str], None] = print,
              prepared: PreparedModel | None = None) -> list[dict]:
    """Evaluate ``points`` (phase 1 on validation, phase 2 on test) into ``out``.

    ``prepared`` (from :func:`prepare_sweep`) reuses a calibration the caller already made.
    """
    from tqdm import tqdm

    if not points:
        raise SweepError("the grid is empty: nothing to evaluate")
    ids = [p.id for p in points]
    if len(set(ids)) != len(ids):
        raise SweepError("the grid lists the same configuration twice")
    rank, world = init_distributed()
    rows = broadcast_object(open_output(out, manifest, force) if rank == 0 else [])
    prepared = prepared or prepare_sweep(model, splits, settings)
    device = next(prepared.model.parameters()).device
    val = splits.val.subset(torch.arange(min(settings.val_size, len(splits.val))))
    by_id = {p.id: p for p in points}
    done = {(r["id"], r["split"]) for r in rows}

    def measure(jobs: list[tuple[str, str]], dataset_for: dict[str, ImageDataset], title: str):
        nonlocal rows
        todo = [job for job in jobs if job not in done]
        bar = tqdm(total=len(todo), desc=title, disable=(not progress or rank != 0) or None,
                   leave=False)
        step = 4 * world  # one round: a few points per process, then one write
        for start in range(0, len(todo), step):
            mine = todo[start:start + step][rank::world]
            new = []
            for point_id, split in mine:
                quantized = prepared.apply(by_id[point_id].config(prepared.kinds))
                dataset = dataset_for[split]
                acc = evaluate(quantized, dataset, settings.batch_size, device)
                new.append({**by_id[point_id].describe(), "split": split,
                            "images": acc.count, "top1": round(acc.top1, 4),
                            "top5": round(acc.top5, 4)})
            new = gather_lists(new, world)
            rows = rows + new
            done.update((r["id"], r["split"]) for r in new)
            if rank == 0:
                _write_rows(out / ROWS_FILE, rows)
            bar.update(len(todo[start:start + step]))
        bar.close()

    splits_by_name = {"val": val, "test": splits.test}
    measure([(i, "val") for i in ids], splits_by_name, "validation")
    val_rows = [r for r in rows if r["split"] == "val" and r["id"] in by_id]
    test_ids = selected_for_test(val_rows)
    if settings.oracle:
        test_ids += [i for i in ids if by_id[i].group == "acts-global" and i not in test_ids]
    measure([(i, "test") for i in test_ids], splits_by_name, "test")
    if rank == 0:
        write_json_atomic(out / "sweep.json", {"manifest": manifest, "rows": rows})
        log(f"{len(rows)} rows in {out / ROWS_FILE}")
    return rows


def paper_sweep(model: torch.nn.Module, splits: Splits, out: Path, manifest: dict,
                settings: SweepSettings, *, fsr_range: tuple[int, int] | None = None,
                method: str = "mse", act_bits: tuple[int, ...] = (3, 4, 5),
                force: bool = False, progress: bool = True,
                log: Callable[[str], None] = print
                ) -> tuple[list[dict], PreparedModel, tuple[int, int]]:
    """Calibrate once, then run :func:`paper_grid` (over ``fsr_range``, by default
    :func:`default_fsr_range`) into ``out``; return the rows, the calibration and the range."""
    prepared = prepare_sweep(model, splits, settings)
    log(prepared.coverage())
    fsr_range = fsr_range or default_fsr_range(prepared)
    points = paper_grid(fsr_range, method, act_bits)
    manifest = {**manifest, "fsr_range": list(fsr_range), "fsr_method": method,
                "act_bits": list(act_bits), "points": len(points)}
    rows = run_sweep(model, splits, points, out, manifest, settings, force=force,
                     progress=progress, log=log, prepared=prepared)
    return rows, prepared, fsr_range
