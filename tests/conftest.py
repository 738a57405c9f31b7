"""Shared fixtures. Tests that need Fashion-MNIST fail (never skip) when it is missing."""

import gzip
import importlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests import the reference codecs directly

from logquant.data import FASHION_FILES, load_splits, resolve_data_dir  # noqa: E402


def require(module: str):
    """Import an optional test dependency (a test extra): skip the test when it is missing on
    a developer's machine, fail when the CI environment variable is set (CI installs
    ``.[test]``, so a missing package there is a broken setup, not a reason to skip)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is required in CI (pip install -e '.[test]'): {exc}")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="session")
def fashion():
    """The real Fashion-MNIST splits (55,000 train / 5,000 val / 10,000 test)."""
    directory = resolve_data_dir(None)
    if not directory.is_dir():
        pytest.fail(f"Fashion-MNIST not found at {directory}: run 'apt-get install "
                    "dataset-fashion-mnist' (make test does) or set LOGQUANT_DATA_DIR")
    return load_splits()


def write_idx(path, array):
    """Write a uint8 array as a gzipped IDX file (the format Fashion-MNIST ships in)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


@pytest.fixture(scope="session")
def small_fashion_dir(fashion, tmp_path_factory):
    """A directory of real Fashion-MNIST IDX files cut to 2,000 train and 500 test images."""
    directory = tmp_path_factory.mktemp("fashion_small")
    for part, dataset, count in (("train", fashion.train, 2000), ("test", fashion.test, 500)):
        images, labels = FASHION_FILES[part]
        write_idx(directory / f"{images}.gz", dataset.images[:count, 0].numpy())
        write_idx(directory / f"{labels}.gz", dataset.labels[:count].numpy().astype("uint8"))
    return directory


@pytest.fixture(scope="session")
def refcnn_export(fashion, tmp_path_factory):
    """The bundled reference model exported with log4 weights and activations:
    (LqzModel, the float32 PyTorch model of the same network, path of the .lqz file)."""
    from logquant import lqz
    from logquant.config import QuantConfig
    from logquant.export import build_lqz, quantize_for_export
    from logquant.models import load_model

    config = QuantConfig(conv_weights="log4", fc_weights="log4", acts="log4")
    qmodel, offset = quantize_for_export(load_model("refcnn"), config,
                                         fashion.val.images[:1000], fashion.val.mean,
                                         fashion.val.std, num_batches=4)
    network = build_lqz(qmodel, offset, [1, 28, 28], {"config": config.to_dict()})
    path = tmp_path_factory.mktemp("lqz") / "refcnn_log4.lqz"
    lqz.save(network, path)
    return network, qmodel, path
