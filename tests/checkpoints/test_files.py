import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.checkpoints.files import CheckpointError, file_sha256, open_state_dict


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.bias": torch.randn(5, generator=g)}


def test_safetensors_roundtrip_with_metadata(tmp_path, weights):
    p = tmp_path / "m.safetensors"
    save_file(weights, p, metadata={"noisecraft.family": "{}"})
    with open_state_dict(p) as f:
        assert sorted(f.keys()) == sorted(weights)
        assert f.metadata == {"noisecraft.family": "{}"}
        assert f.shape("a.weight") == (4, 3)
        for k, v in weights.items():
            assert torch.equal(f[k], v)
        assert set(f.with_prefix("a.")) == {"weight"}


def test_truncated_safetensors_is_refused(tmp_path, weights):
    p = tmp_path / "m.safetensors"
    save_file(weights, p)
    data = p.read_bytes()
    p.write_bytes(data[:-8])
    with pytest.raises(CheckpointError, match="truncated") as e:
        open_state_dict(p)
    assert "m.safetensors" in str(e.value)


def test_corrupt_header_is_refused(tmp_path, weights):
    p = tmp_path / "m.safetensors"
    save_file(weights, p)
    data = bytearray(p.read_bytes())
    data[9:14] = b"#####"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not JSON"):
        open_state_dict(p)
    p.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        open_state_dict(p)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        open_state_dict(p)


def test_plain_ckpt_loads_without_code(tmp_path, weights):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": weights, "global_step": 10}, p)
    with open_state_dict(p) as f:
        assert torch.equal(f["a.weight"], weights["a.weight"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, p)
    with pytest.raises(CheckpointError, match="never executes code") as e:
        open_state_dict(p)
    assert "evil.ckpt" in str(e.value)
    assert not (tmp_path / "pwned").exists()
    # an old-style (non-zip) pickle too
    q = tmp_path / "evil.pt"
    q.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError):
        open_state_dict(q)
    assert not (tmp_path / "pwned").exists()


def test_wrong_paths(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_state_dict(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="unknown file type"):
        open_state_dict(tmp_path / "x.txt")
    (tmp_path / "bad.ckpt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        open_state_dict(tmp_path / "bad.ckpt")


def test_sha256(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p).startswith("ba7816bf8f")
