"""Artifact round trip, tamper detection, and eval-mode batch independence."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import META_FILE, WEIGHTS_FILE, ArtifactError, load_artifact, save_artifact
from model.net import NetConfig, bn_layers, build_net
from model.preprocess import Normalization


def _trained_like_net(seed: int = 0) -> torch.nn.Module:
    """A small BN CNN with non-trivial weights and running statistics."""
    torch.manual_seed(seed)
    net = build_net(NetConfig(conv_channels=(4, 8), hidden=16))
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.rand(32, 1, 28, 28))
    return net.eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    net = _trained_like_net()
    save_artifact(
        tmp_path / "art", net, NetConfig(conv_channels=(4, 8), hidden=16), name="unit", version="v1",
        normalization=Normalization(0.13, 0.31), metrics={"test_accuracy": 0.5}, data_fingerprint="f" * 64,
        data_source="synthetic",
    )  # fmt: skip
    return tmp_path / "art", net


def test_round_trip_gives_identical_outputs(saved: tuple[Path, torch.nn.Module]) -> None:
    path, net = saved
    art = load_artifact(path)
    assert not art.net.training
    x = torch.rand(7, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(art.net(x), net(x))
    for name, bn in bn_layers(art.net).items():
        ref = bn_layers(net)[name]
        assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)
        assert int(bn.num_batches_tracked) == 3
    assert art.meta.version == "v1" and art.normalization == Normalization(0.13, 0.31)
    assert art.config == NetConfig(conv_channels=(4, 8), hidden=16)


def test_loading_never_unpickles(saved: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("pickle used while loading an artifact")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    load_artifact(saved[0])


def test_tampered_weights_are_refused(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    data = bytearray((path / WEIGHTS_FILE).read_bytes())
    data[-5] ^= 0xFF
    (path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="hash mismatch"):
        load_artifact(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
        (lambda m: m["architecture"].update(hidden=17), "do not match the architecture"),
        (lambda m: m["architecture"].update(arch="resnet"), "invalid architecture"),
        (lambda m: m.update(class_names=["a", "b"]), "class names"),
        (lambda m: m["weights"].update(file="../model.safetensors"), "must not contain a path"),
        (lambda m: m.update(surprise=1), "invalid"),
    ],
)
def test_mismatched_metadata_is_refused(saved: tuple[Path, torch.nn.Module], edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path, _ = saved
    meta = json.loads((path / META_FILE).read_text())
    edit(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=message):
        load_artifact(path)


def test_missing_files_give_clear_errors(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"no model\.json"):
        load_artifact(tmp_path / "nowhere")
    path, _ = saved
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load_artifact(path)
    (path / META_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not readable JSON"):
        load_artifact(path)


def test_save_replaces_atomically(saved: tuple[Path, torch.nn.Module]) -> None:
    path, net = saved
    meta = save_artifact(
        path, net, NetConfig(conv_channels=(4, 8), hidden=16), name="unit", version="v2",
        normalization=Normalization(), metrics={}, data_fingerprint="f", data_source="s",
    )  # fmt: skip
    assert load_artifact(path).meta.version == meta.version == "v2"
    assert sorted(p.name for p in path.parent.iterdir()) == ["art"], "no temp or old directories left behind"
    shutil.rmtree(path)


def test_eval_mode_batch_independence(tiny_artifact) -> None:  # type: ignore[no-untyped-def]
    """In eval mode, an image's probabilities do not depend on which other images share its batch."""
    net = tiny_artifact.net
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((33, 1, 28, 28), dtype=np.float32))
    with torch.inference_mode():
        alone = torch.cat([torch.softmax(net(x[i : i + 1]), 1) for i in range(len(x))])
        together = torch.softmax(net(x), 1)
        shuffled = torch.softmax(net(x.flip(0)), 1).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled, alone, rtol=1e-5, atol=1e-6)


def test_same_weights_give_the_same_hash(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    """The weights file is byte-stable: no unordered metadata, so equal weights always hash equal."""
    path, net = saved
    digests = set()
    for i in range(3):
        meta = save_artifact(
            tmp_path / f"again{i}", net, NetConfig(conv_channels=(4, 8), hidden=16), name="unit", version="v1",
            normalization=Normalization(0.13, 0.31), metrics={}, data_fingerprint="f", data_source="s",
        )  # fmt: skip
        digests.add(meta.weights.sha256)
    assert digests == {load_artifact(path).sha256}


_COUNT_OPENS = """
import sys
from pathlib import Path
from model.artifact import WEIGHTS_FILE, load_artifact
opened = []
sys.addaudithook(lambda event, args: opened.append(str(args[0])) if event == "open" and str(args[0]).endswith(WEIGHTS_FILE) else None)
load_artifact(Path(sys.argv[1]))
print(len(opened))
"""


def test_the_weights_are_read_once_so_the_hashed_bytes_are_the_loaded_bytes(tiny_artifact_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_OPENS, str(tiny_artifact_dir)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "1", "a second open could read other bytes than the ones hashed"
