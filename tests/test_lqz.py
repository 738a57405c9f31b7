"""The .lqz container: exact round trip, size, and rejection of damaged or hostile files."""

import json
import struct

import numpy as np
import pytest
import torch

from logquant import lqz
from logquant.lqz import LqzError


def test_round_trip_reproduces_identical_codes_biases_and_header(refcnn_export):
    network, _, path = refcnn_export
    loaded = lqz.load(path)
    assert loaded.header == json.loads(json.dumps(network.header))
    assert network.weights.keys() == loaded.weights.keys()
    for name, codes in network.weights.items():
        assert torch.equal(codes, loaded.weights[name]), name
    for name, bias in network.biases.items():
        assert torch.equal(bias, loaded.biases[name]), name


def test_saving_twice_gives_identical_bytes(refcnn_export, tmp_path):
    network, _, path = refcnn_export
    lqz.save(lqz.load(path), tmp_path / "again.lqz")
    assert (tmp_path / "again.lqz").read_bytes() == path.read_bytes()


def test_file_is_a_standard_safetensors_container(refcnn_export):
    """Any safetensors reader opens it: the packed codes, biases and the header."""
    from safetensors import safe_open

    network, _, path = refcnn_export
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["lqz"])["format"] == "logquant-lqz"
        assert set(f.keys()) == set(network.weights) | set(network.biases)
        name = next(iter(network.biases))
        assert torch.equal(f.get_tensor(name).long(), network.biases[name])


def test_three_bit_file_is_over_ten_times_smaller_than_float32(fashion, tmp_path):
    """Target: at least 0.95 * 32/3 smaller than the float32 safetensors of the weights."""
    from logquant.config import QuantConfig
    from logquant.export import build_lqz, float32_size, quantize_for_export
    from logquant.models import load_model

    config = QuantConfig(conv_weights="log3", fc_weights="log3", acts="log3")
    qmodel, offset = quantize_for_export(load_model("refcnn"), config, fashion.val.images[:500],
                                         fashion.val.mean, fashion.val.std, num_batches=2)
    size = lqz.save(build_lqz(qmodel, offset, [1, 28, 28]), tmp_path / "m.lqz")
    float_size = float32_size(qmodel)
    assert float_size / size >= 0.95 * 32 / 3, (float_size, size)


# ----------------------------------------------------------------------------------------
# Damaged and hostile files: one LqzError, never another exception


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _rewrite(path, out, edit_header=None, edit_arrays=None):
    """A file with an edited lqz header / tensors and a *valid* checksum (a crafted file)."""
    meta, arrays = lqz.read_container(path)
    header = json.loads(meta["lqz"])
    arrays = {k: np.array(v) for k, v in arrays.items()}
    if edit_header:
        edit_header(header)
    if edit_arrays:
        edit_arrays(arrays)
    out.write_bytes(lqz.file_bytes(header, arrays))
    return out


def assert_rejected(path, *fragments):
    with pytest.raises(LqzError) as info:
        lqz.load(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_truncation_at_every_section_boundary_is_rejected(refcnn_export, tmp_path):
    _, _, path = refcnn_export
    data = path.read_bytes()
    n, table, _ = _split(data)
    cuts = {0, 1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(data) - 1}
    for info in table.values():
        if isinstance(info, dict) and "data_offsets" in info:
            begin, end = info["data_offsets"]
            cuts.update({8 + n + begin, 8 + n + end - 1})
    for cut in sorted(c for c in cuts if c < len(data)):
        target = tmp_path / "cut.lqz"
        target.write_bytes(data[:cut])
        assert_rejected(target)


def test_flipped_bytes_are_rejected(refcnn_export, tmp_path):
    """Every byte of the length and header, and a sample of the data, flipped: the file is
    rejected (or, for a flip the JSON parser ignores, loads identically)."""
    network, _, path = refcnn_export
    data = path.read_bytes()
    n, _, _ = _split(data)
    rng = np.random.default_rng(0)
    positions = list(range(0, 8 + n, 3)) + rng.integers(8 + n, len(data), 300).tolist()
    target = tmp_path / "flip.lqz"
    loaded_same = 0
    for pos in positions:
        damaged = bytearray(data)
        damaged[pos] ^= 1 << int(rng.integers(8))
        target.write_bytes(bytes(damaged))
        try:
            loaded = lqz.load(target)
        except LqzError:
            continue
        loaded_same += 1
        assert loaded.header == network.header
        assert all(torch.equal(loaded.weights[k], v) for k, v in network.weights.items())
    assert loaded_same < len(positions) // 20


def test_oversized_header_length_is_rejected_before_reading(refcnn_export, tmp_path):
    _, _, path = refcnn_export
    data = path.read_bytes()
    target = tmp_path / "huge.lqz"
    target.write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    assert_rejected(target, "header length")


def test_checksum_mismatch_is_named(refcnn_export, tmp_path):
    _, _, path = refcnn_export
    damaged = bytearray(path.read_bytes())
    damaged[-1] ^= 0xFF  # a bias byte: offsets and shapes all stay valid
    target = tmp_path / "sum.lqz"
    target.write_bytes(bytes(damaged))
    assert_rejected(target, "checksum mismatch")


def test_crafted_files_with_valid_checksums_are_rejected(refcnn_export, tmp_path):
    _, _, path = refcnn_export

    def version(h):
        h["version"] = 2

    def shape(h):
        next(op for op in h["ops"] if op["op"] == "conv")["shape"][0] *= 2

    def bits(h):
        next(op for op in h["ops"] if op["op"] == "conv")["weight_format"] = "log9s@fsr0"

    def fsr(h):
        next(op for op in h["ops"] if op["op"] == "quantize")["format"] = "log4@fsr99"

    def unknown(h):
        h["ops"].insert(1, {"op": "softmax", "in": h["ops"][0]["out"], "out": "s"})

    def dangling(h):
        next(op for op in h["ops"] if op["op"] == "relu")["in"] = "nowhere"

    cases = [(version, "unsupported .lqz version 2"), (shape, "features.0"),
             (bits, "bits must be in 1..8"), (fsr, "fsr"), (unknown, "unknown op 'softmax'"),
             (dangling, "not an earlier op's output")]
    for edit, fragment in cases:
        assert_rejected(_rewrite(path, tmp_path / "crafted.lqz", edit), fragment)

    def extra(arrays):
        arrays["payload"] = np.zeros(4, dtype=np.uint8)

    assert_rejected(_rewrite(path, tmp_path / "extra.lqz", edit_arrays=extra), "payload")


def test_pickle_disguised_as_lqz_is_refused_without_running_it(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('ran')" % (tmp_path / "pwned"),))

    target = tmp_path / "model.lqz"
    torch.save({"weights": Payload()}, target)
    assert_rejected(target)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_and_non_lqz_safetensors_are_rejected(tmp_path):
    from safetensors.numpy import save_file

    assert_rejected(tmp_path / "absent.lqz", "no such .lqz file")
    save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp_path / "plain.safetensors"))
    assert_rejected(tmp_path / "plain.safetensors")


def test_entropy_coded_file_round_trips_near_the_entropy(refcnn_export, tmp_path):
    from logquant.entropy import empirical_entropy_bits

    network, _, path = refcnn_export
    size = lqz.save(network, tmp_path / "c.lqz", compress=True)
    assert size < path.stat().st_size
    loaded = lqz.load(tmp_path / "c.lqz")
    for name, codes in network.weights.items():
        assert torch.equal(loaded.weights[name], codes), name
    _, arrays = lqz.read_container(tmp_path / "c.lqz")
    count = sum(c.numel() for c in network.weights.values())
    coded = sum(8 * (arrays[n].nbytes + (arrays[n + ".freq"].nbytes if n + ".freq" in arrays
                                         else 0)) for n in network.weights)
    limit = sum(empirical_entropy_bits(c.numpy()) for c in network.weights.values())
    assert limit / count < coded / count < limit / count * 1.01 + 0.01
    assert coded / count < 4  # better than packing the 4-bit codes
    encodings = {op["name"]: op["weight_encoding"] for op in loaded.layer_ops()}
    assert list(encodings.values()).count("rans") >= len(encodings) - 1, encodings


def test_damaged_entropy_coded_weights_are_rejected(refcnn_export, tmp_path):
    network, _, _ = refcnn_export
    lqz.save(network, tmp_path / "c.lqz", compress=True)
    name = "classifier.1.weight"

    def flip(arrays):
        arrays[name][len(arrays[name]) // 2] ^= 0x5A

    def truncate(arrays):
        arrays[name] = arrays[name][:-3]

    def table(arrays):
        arrays[name + ".freq"][0] += 1

    for edit in (flip, truncate, table):
        assert_rejected(_rewrite(tmp_path / "c.lqz", tmp_path / "bad.lqz", edit_arrays=edit),
                        "classifier.1")


def test_weight_count_beyond_64_bits_is_rejected_not_wrapped(refcnn_export, tmp_path):
    """2^16 in each of four dims is 2^64 weights: a wrapped product would claim zero."""
    _, _, path = refcnn_export

    def huge(h):
        next(op for op in h["ops"] if op["op"] == "conv")["shape"] = [1 << 16] * 4

    assert_rejected(_rewrite(path, tmp_path / "huge.lqz", huge), "bytes, the file holds")


def test_entropy_coded_layer_cannot_claim_more_weights_than_its_stream_holds(refcnn_export,
                                                                             tmp_path):
    """The reader allocates what the shape claims only up to 32 codes per stream byte."""
    network, _, _ = refcnn_export
    lqz.save(network, tmp_path / "c.lqz", compress=True)

    def huge(h):
        op = next(op for op in h["ops"] if op["op"] == "linear")
        op["shape"] = [1 << 20, 1 << 10]

    assert_rejected(_rewrite(tmp_path / "c.lqz", tmp_path / "bad.lqz", huge),
                    "cannot come from", "at most 32 per byte")


def test_near_constant_layer_is_packed_even_when_compressing(tmp_path):
    """Entropy coding would need less than 1/4 bit per weight there: the writer packs it,
    so honest files never trip the reader's limit."""
    codes = torch.zeros(64, 64, 3, 3, dtype=torch.uint8)
    codes[0, 0, 0, 0] = 3
    header = {"format": lqz.MAGIC, "version": lqz.VERSION, "ops": [
        {"op": "input", "out": "x", "shape": [64, 8, 8], "offset": [0] * 64},
        {"op": "conv", "in": "x", "out": "c", "name": "c", "weight": "c.weight", "bias": None,
         "weight_format": "log4s@fsr0", "shape": [64, 64, 3, 3], "stride": [1, 1],
         "padding": [1, 1], "dilation": [1, 1], "groups": 1},
        {"op": "output", "in": "c", "out": "y"}]}
    lqz.save(lqz.LqzModel(header, {"c.weight": codes}, {}), tmp_path / "m.lqz", compress=True)
    loaded = lqz.load(tmp_path / "m.lqz")
    assert loaded.ops[1]["weight_encoding"] == "packed"
    assert torch.equal(loaded.weights["c.weight"], codes)


def test_a_small_file_asking_for_gigabytes_is_refused_when_planned(refcnn_export, tmp_path):
    """A crafted conv with huge padding: the plan knows the sizes and refuses before any
    run allocates them (the file is a few hundred KB)."""
    from logquant.engine import Engine
    from logquant.engine.plan import MAX_BYTES_PER_IMAGE, plan

    _, _, path = refcnn_export
    assert 0 < plan(lqz.load(path)).bytes_per_image < MAX_BYTES_PER_IMAGE

    def pad_hugely(header):
        conv = next(op for op in header["ops"] if op["op"] == "conv")
        conv["padding"] = [1024, 1024]  # the largest the reader accepts

    bad = _rewrite(path, tmp_path / "padded.lqz", pad_hugely)
    with pytest.raises(LqzError, match="GiB of working memory per image"):
        Engine(lqz.load(bad))
