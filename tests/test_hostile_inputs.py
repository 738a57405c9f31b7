"""A careless or hostile user, generated: each class of bad input from README "Errors and
guarantees" (and issue 13), built here as real files and command lines, run through the
real ``logquant`` entry point in this process. Every case must end in exit code 2 and one
``error:`` line, leave every file under the test's folder byte-identical (nothing written,
nothing deleted), stay within a memory bound (peak RSS growth, measured by resetting the
kernel's high-water mark) and answer within seconds, not after minutes of work."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import write_idx
from logquant.cli import main
from logquant.data import FASHION_FILES

MEMORY_BOUND = 512 << 20  # bytes of peak RSS growth a refusal may cost
TIME_BOUND = 20.0  # seconds: refusals come before work (loading the small data included)


def _peak_rss() -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text)[1]) << 10


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root``: kind and, for files, a hash of the content."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            state[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[rel] = "dir"
        elif path.name == ".logquant.lock":  # holds the pid of its last holder: not data
            state[rel] = "lock"
        elif path.is_file():
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[rel] = f"special:{os.stat(path).st_mode:o}"
    return state


# ----------------------------------------------------------------------------------------
# Builders: (folder to build in, fixtures) -> argv. Each makes the hostile input for real.


def _data_copy(where: Path, small: Path) -> Path:
    data = where / "data"
    data.mkdir()
    for entry in small.iterdir():
        (data / entry.name).write_bytes(entry.read_bytes())
    return data


def _idx_path(data: Path, part: str) -> Path:
    return data / f"{FASHION_FILES[part][0]}.gz"


def corrupt_gzip(where, fx):
    data = _data_copy(where, fx["small"])
    raw = bytearray(_idx_path(data, "test").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    _idx_path(data, "test").write_bytes(bytes(raw))
    return ["eval", "--data-dir", str(data)], "corrupt gzip data"


def idx_100_dims(where, fx):
    data = _data_copy(where, fx["small"])
    _idx_path(data, "test").write_bytes(gzip.compress(bytes([0, 0, 8, 100]) + bytes(400)))
    return ["eval", "--data-dir", str(data)], "100 dimensions"


def idx_gzip_bomb(where, fx):
    data = _data_copy(where, fx["small"])
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (10, 28, 28))
    deflate = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = deflate.compress(header) + b"".join(deflate.compress(bytes(1 << 20))
                                               for _ in range(1024)) + deflate.flush()
    _idx_path(data, "test").write_bytes(bomb)  # 1 MB declaring 7840 bytes, inflating to 1 GiB
    return ["eval", "--data-dir", str(data)], "more data than the IDX header declares"


def images_of_another_size(where, fx):
    data = _data_copy(where, fx["small"])
    write_idx(_idx_path(data, "test"), np.zeros((500, 32, 32), np.uint8))
    return ["eval", "--data-dir", str(data)], "32"


def _image_folder(where: Path, test_classes=("cat", "dog")) -> Path:
    from PIL import Image

    root = where / "images"
    pixels = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    for part, classes in (("train", ("cat", "dog")), ("test", test_classes)):
        for cls in classes:
            (root / part / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(pixels).save(root / part / cls / f"{i}.png")
    return root


def classes_differ(where, fx):
    root = _image_folder(where, test_classes=("cat", "cow"))
    return ["eval", "--model", "resnet18", "--data-dir", str(root), "--image-size", "32"], \
        "classes"


def image_bomb(where, fx):
    import struct

    root = _image_folder(where)
    side = 30000
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(header)) + b"IHDR" + header + struct.pack(
        ">I", zlib.crc32(b"IHDR" + header))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    (root / "train" / "cat" / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)
    return ["eval", "--model", "resnet18", "--data-dir", str(root), "--image-size", "32"], \
        "pixel limit"


def _config(where: Path, text: str | bytes) -> Path:
    path = where / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def config_deep(where, fx):
    return ["eval", "--config", str(_config(where, "[" * 100000 + "]" * 100000))], "config"


def config_huge_int(where, fx):
    return ["eval", "--config", str(_config(where, '{"acts_fsr": ' + "9" * 5000 + "}"))], \
        "config"


def config_latin1(where, fx):
    return ["eval", "--config", str(_config(where, '{"acts": "log4\xe9"}'.encode("latin-1")))], \
        "UTF-8"


def config_string_bool(where, fx):
    return ["eval", "--config", str(_config(where, json.dumps(
        {"conv_weights": "log4", "quantize_first_input": "no"})))], "quantize_first_input"


def config_override_type(where, fx):
    return ["eval", "--config", str(_config(where, json.dumps(
        {"conv_weights": "log4", "overrides": [["features.0", "log4"]]})))], "overrides"


def config_unicode_digits(where, fx):
    return ["eval", "--config", str(_config(where, json.dumps({"acts": "log\u0664"})))], "log"


def qat_metadata(where, fx):
    from safetensors.torch import save_file

    from logquant.models import load_model

    state = {k: v.contiguous() for k, v in load_model("refcnn").state_dict().items()}
    path = where / "qat.safetensors"
    save_file(state, str(path), metadata={"logquant_qat": '{"config": [1, 2'})
    return ["eval", "--checkpoint", str(path)], "logquant_qat"


def pickle_checkpoint(where, fx):
    import pickle

    path = where / "w.pt"
    path.write_bytes(pickle.dumps({"weight": os.system}))  # would run code if unpickled
    return ["eval", "--checkpoint", str(path)], "w.pt"


def export_onto_its_checkpoint(where, fx):
    from logquant.io import save_weights
    from logquant.models import load_model

    path = where / "w.safetensors"
    save_weights(load_model("refcnn"), path)
    return ["eval", "--checkpoint", str(path), "--weights", "log4", "--save-quantized",
            str(path)], "is also an input"


def export_onto_fifo(where, fx):
    os.mkfifo(where / "pipe.lqz")
    return ["export", "--weights", "log4", "--acts", "log4", "--out",
            str(where / "pipe.lqz")], "not a regular file"


def export_onto_device(where, fx):
    (where / "null.lqz").symlink_to("/dev/null")
    return ["export", "--weights", "log4", "--acts", "log4", "--out",
            str(where / "null.lqz")], "not a regular file"


def _users_folder(where: Path) -> Path:
    folder = where / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


def sweep_into_users_folder(where, fx):
    return ["sweep", "--out", str(_users_folder(where))], "holds other files"


def search_into_users_folder(where, fx):
    return ["search", "--out", str(_users_folder(where))], "did not write"


def vectors_into_users_folder(where, fx):
    return ["vectors", fx["lqz"], "--layer", "features.0", "--out",
            str(_users_folder(where))], "did not write"


def run_with_unused_options(where, fx):
    return ["run", fx["lqz"], "--model", "resnet18"], "--model"


def lqz_huge_padding(where, fx):
    from test_lqz import _rewrite

    def pad(header):
        next(op for op in header["ops"] if op["op"] == "conv")["padding"] = [1024, 1024]

    path = _rewrite(Path(fx["lqz"]), where / "padded.lqz", pad)
    return ["run", str(path)], "GiB of working memory per image"


def resume_edited_state(where, fx):
    import torch

    from logquant.models import load_model
    from logquant.train import save_checkpoint

    model = load_model("refcnn")
    ckpt = where / "ckpt"
    save_checkpoint(ckpt, model, torch.optim.SGD(model.parameters(), lr=0.1),
                    torch.Generator(), {"epoch": 0, "step": 1, "history": [],
                                        "train_config": {}})
    (ckpt / "epoch-0000" / "state.json").write_text('{"epoch": "one"}')
    (ckpt / ".logquant.lock").touch()  # as `logquant train` leaves its folder
    return ["train", "--out", str(where / "m.safetensors"), "--checkpoint-dir", str(ckpt),
            "--resume", "--data-dir", str(fx["small"])], "state.json"


def resume_latest_escapes(where, fx):
    ckpt = where / "ckpt"
    ckpt.mkdir()
    (ckpt / "LATEST").write_text("../../etc\n")
    (ckpt / ".logquant.lock").touch()
    return ["train", "--out", str(where / "m.safetensors"), "--checkpoint-dir", str(ckpt),
            "--resume", "--data-dir", str(fx["small"])], "LATEST"


def argument_cases():
    """Command-line values that once exhausted memory or raised inside torch."""
    return {
        "fsr_range_huge": (["sweep", "--out", "{w}/s", "--fsr-range", "0:100000000"], "-64"),
        "image_size_huge": (["eval", "--image-size", "30000"], "2048"),
        "device_meta": (["eval", "--device", "meta"], "cpu or cuda"),
        "model_colon": (["eval", "--model", ":x"], ":x"),
        "seed_2_70": (["train", "--out", "{w}/m.safetensors", "--seed", str(2**70)], "2^63"),
        "bits_unicode": (["eval", "--weights", "log\u0664"], "log"),
        "fsr_unicode": (["eval", "--weights", "log4@fsr\u0661"], "log4"),
        "bits_many_digits": (["eval", "--weights", "log" + "9" * 5000], "log"),
        # options a command would not use are refused, not ignored
        "image_size_with_idx": (["eval", "--image-size", "64"], "applies to image folders"),
        "export_device": (["export", "--weights", "log4", "--acts", "log4", "--device", "cuda",
                           "--out", "{w}/m.lqz"], "export computes on the CPU"),
        "search_device": (["search", "--device", "cuda:0", "--out", "{w}/s"],
                          "search computes on the CPU"),
        "percentile_unused": (["eval", "--weights", "log4", "--percentile", "99"],
                              "--percentile applies"),
        "qat_options_in_float": (["train", "--out", "{w}/m.safetensors", "--fold-bn"],
                                 "quantization-aware training options"),
        "calib_with_quantized_file": (["eval", "--quantized", "{w}/q.safetensors",
                                       "--calib-batches", "2"], "carries its FSRs"),
    }


BUILDERS: dict[str, Callable] = {f.__name__: f for f in (
    corrupt_gzip, idx_100_dims, idx_gzip_bomb, images_of_another_size,
    classes_differ, image_bomb, config_deep, config_huge_int, config_latin1,
    config_string_bool, config_override_type, config_unicode_digits, qat_metadata,
    pickle_checkpoint, export_onto_its_checkpoint, export_onto_fifo, export_onto_device,
    sweep_into_users_folder, search_into_users_folder, vectors_into_users_folder,
    run_with_unused_options, lqz_huge_padding, resume_edited_state, resume_latest_escapes)}
for _name, (_argv, _fragment) in argument_cases().items():
    BUILDERS[_name] = (lambda argv, fragment: lambda where, fx: (
        [a.format(w=where) for a in argv], fragment))(_argv, _fragment)


@pytest.fixture
def fx(refcnn_export, small_fashion_dir):
    return {"lqz": str(refcnn_export[2]), "small": small_fashion_dir}


@pytest.mark.parametrize("case", sorted(BUILDERS))
def test_hostile_input_is_one_line_exit_2_nothing_written_bounded(case, tmp_path, fx, capsys,
                                                                   monkeypatch):
    where = tmp_path / "work"
    where.mkdir()
    argv, fragment = BUILDERS[case](where, fx)
    monkeypatch.setenv("LOGQUANT_DATA_DIR", str(fx["small"]))  # defaults read small data
    before = _tree(tmp_path)
    capsys.readouterr()
    start_rss = _peak_rss()
    _reset_peak_rss()
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    grown = _peak_rss() - start_rss
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert fragment in err, err
    assert _tree(tmp_path) == before, "the refusal wrote or deleted files"
    assert grown < MEMORY_BOUND, f"peak RSS grew by {grown >> 20} MiB before the refusal"
    assert elapsed < TIME_BOUND, f"refused only after {elapsed:.1f} s"


def test_a_second_writer_is_refused_at_once(tmp_path, fx):
    """A sweep into a folder another process is writing is refused before any work."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(folder / '.logquant.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242\\n')\n"
         "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "logquant", "sweep", "--out", str(folder),
                               "--data-dir", str(fx["small"])], capture_output=True, text=True,
                              timeout=120)
        elapsed = time.perf_counter() - start
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "another logquant process" in proc.stderr
    assert elapsed < 15, f"refused after {elapsed:.1f} s (interpreter start included)"
    assert os.listdir(folder) == [".logquant.lock"]
