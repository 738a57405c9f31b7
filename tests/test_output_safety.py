"""One rule for what a command writes: regular files of its own kind, never its inputs,
never devices or FIFOs, never into a folder of someone else's files; and it deletes only
what it wrote."""

import os
import stat

import torch
from torch import nn

from logquant.cli import main
from logquant.train import KEEP_CHECKPOINTS, save_checkpoint


def _run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_outputs_never_replace_inputs_devices_fifos_or_other_kinds(capsys, fashion, tmp_path,
                                                                   refcnn_export):
    from logquant.io import save_weights
    from logquant.models import load_model

    checkpoint = tmp_path / "w.safetensors"
    save_weights(load_model("refcnn"), checkpoint)
    before = checkpoint.read_bytes()
    code, err = _run(capsys, "eval", "--checkpoint", str(checkpoint), "--weights", "log4",
                     "--save-quantized", str(checkpoint))
    assert code == 2 and "is also an input of this command" in err
    code, err = _run(capsys, "export", "--checkpoint", str(checkpoint), "--weights", "log4",
                     "--acts", "log4", "--out", str(checkpoint))
    assert code == 2 and "must end in .lqz" in err
    assert checkpoint.read_bytes() == before
    fifo = tmp_path / "pipe.lqz"
    os.mkfifo(fifo)
    code, err = _run(capsys, "export", "--weights", "log4", "--acts", "log4", "--out",
                     str(fifo))
    assert code == 2 and "not a regular file" in err and stat.S_ISFIFO(os.stat(fifo).st_mode)
    device = tmp_path / "device.lqz"
    device.symlink_to("/dev/null")  # a name of our kind that leads to a device
    code, err = _run(capsys, "export", "--weights", "log4", "--acts", "log4", "--out",
                     str(device))
    assert code == 2 and "not a regular file" in err and device.is_symlink()
    users = tmp_path / "mine"
    users.mkdir()
    (users / "notes.txt").write_text("keep me")
    code, err = _run(capsys, "vectors", str(refcnn_export[2]), "--layer", "features.3",
                     "--out", str(users))
    assert code == 2 and "holds files that logquant did not write" in err
    assert os.listdir(users) == ["notes.txt"] and (users / "notes.txt").read_text() == \
        "keep me"


def test_checkpoint_rotation_deletes_only_its_own_folders(tmp_path):
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    mine = [tmp_path / "epoch-0000-mine", tmp_path / "epoch-0001"]
    for folder in mine:
        folder.mkdir()
        (folder / "data.txt").write_text("user data")
    for epoch in range(2, 6):
        save_checkpoint(tmp_path, model, opt, gen, {"epoch": epoch, "step": epoch})
    names = sorted(p.name for p in tmp_path.iterdir())
    kept = [f"epoch-{e:04d}" for e in range(6 - KEEP_CHECKPOINTS, 6)]
    assert names == sorted(["LATEST", "epoch-0000-mine", "epoch-0001", *kept])
    assert all((folder / "data.txt").read_text() == "user data" for folder in mine)
    assert (tmp_path / "LATEST").read_text().strip() == "epoch-0005"


def test_vectors_folder_is_replaced_whole_and_never_with_user_files(capsys, fashion, tmp_path,
                                                                    refcnn_export):
    """A rerun of vectors into its own folder leaves exactly the new set (no stale files of
    another layer); a folder of vectors where the user added a file, or another logquant
    output, is refused before any work; a failed run leaves the old set untouched."""
    lqz_path = str(refcnn_export[2])
    layers = [op["name"] for op in refcnn_export[0].layer_ops()]
    out = tmp_path / "vec"
    assert _run(capsys, "vectors", lqz_path, "--layer", layers[1], "--count", "1",
                "--out", str(out))[0] == 0
    first = sorted(os.listdir(out))
    assert "output_codes.hex" in first
    code, _ = _run(capsys, "vectors", lqz_path, "--layer", layers[-1], "--count", "1",
                   "--out", str(out))  # the last layer: no quantize follows it
    assert code == 0
    files = sorted(os.listdir(out))
    assert "output_codes.hex" not in files and set(files) < set(first) | {"output_codes.hex"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vec"]  # no staging left behind
    before = {name: (out / name).read_bytes() for name in files}
    code, err = _run(capsys, "vectors", lqz_path, "--layer", "nope", "--out", str(out))
    assert code == 2 and {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    (out / "notes.txt").write_text("mine")
    code, err = _run(capsys, "vectors", lqz_path, "--layer", layers[1], "--out", str(out))
    assert code == 2 and "not logquant test vectors" in err
    assert (out / "notes.txt").read_text() == "mine" and len(err.strip().splitlines()) == 1
    sweep_like = tmp_path / "other"
    sweep_like.mkdir()
    (sweep_like / ".logquant.lock").touch()
    (sweep_like / "sweep.csv").write_text("rows")
    code, err = _run(capsys, "vectors", lqz_path, "--layer", layers[1], "--out",
                     str(sweep_like))
    assert code == 2 and (sweep_like / "sweep.csv").read_text() == "rows"
