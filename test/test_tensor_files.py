"""Safetensors read and written one tensor at a time (dyqvla_ros.tensor_files)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dyqvla_ros.tensor_files import TensorFileError, read_each, write_tensors

TENSORS = {
    "a.weight": torch.randn(33, 17).to(torch.bfloat16),
    "a.bias": torch.randn(17),
    "q": torch.randint(0, 255, (8, 6), dtype=torch.uint8),
    "s": torch.rand(2, 6).to(torch.float16),
    "step": torch.tensor(3, dtype=torch.int64),
    "empty": torch.zeros(0, 4),
}


def test_written_one_at_a_time_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "out.safetensors"
    fetched: list[str] = []

    def fetch(name: str) -> torch.Tensor:
        fetched.append(name)
        return TENSORS[name]

    specs = {name: (t.dtype, tuple(t.shape)) for name, t in TENSORS.items()}
    write_tensors(path, specs, fetch, {"format": "x"})
    assert fetched == list(TENSORS)  # asked for one by one, in order
    back = load_file(str(path))
    assert back.keys() == TENSORS.keys()
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in TENSORS.items())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "x"}
    assert not path.with_name(path.name + ".tmp").exists()
    with pytest.raises(ValueError, match="announced"):
        write_tensors(tmp_path / "bad.safetensors", {"a.bias": (torch.float32, (3,))}, fetch)
    assert not (tmp_path / "bad.safetensors").exists()


def test_read_each_names_the_file_and_the_tensor_of_a_truncated_shard(tmp_path):
    good, cut = tmp_path / "good.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    save_file({k: v.contiguous() for k, v in TENSORS.items()}, str(good))
    data = good.read_bytes()
    cut.write_bytes(data[:-100])
    message = r"model-00002-of-00002.safetensors is not a readable .*\(truncated: tensor '\w+(\.\w+)?' ends"
    with pytest.raises(TensorFileError, match=message):
        list(read_each([good, cut]))
    again = tmp_path / "again.safetensors"
    save_file({"a.bias": TENSORS["a.bias"]}, str(again))
    with pytest.raises(TensorFileError, match=r"tensor 'a.bias' is in both .*good.safetensors and .*again"):
        list(read_each([good, again]))


RSS_PROBE = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors import safe_open
    from dyqvla_ros.tensor_files import read_each

    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024

    path, how = sys.argv[1], sys.argv[2]
    before, grown = rss_mb(), 0.0
    if how == "read_each":
        for _name, tensor, _file in read_each([__import__("pathlib").Path(path)]):
            _ = float(tensor[0, 0])  # used, then dropped
            grown = max(grown, rss_mb() - before)
    else:  # one handle for the whole file, as load_file does
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name).clone()
                _ = float(tensor[0, 0])
                del tensor
                grown = max(grown, rss_mb() - before)
    print(grown)
    """
)


def test_read_each_holds_one_tensor_not_the_file(tmp_path):
    """The point of reading per tensor: 500 MB of tensors read and dropped one by one leave
    the process a few tensors (12.6 MB each) larger, as the allocator keeps some freed
    memory (135 MB measured), not the file's size larger (through one handle: 507 MB)."""
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.ones(1536, 2048) for i in range(40)}, str(path))  # 40 x 12.6 MB
    grown = {
        how: float(
            subprocess.run(
                [sys.executable, "-c", RSS_PROBE, str(path), how], capture_output=True, text=True, check=True
            ).stdout
        )
        for how in ("read_each", "one_handle")
    }
    assert grown["one_handle"] > 450, grown  # the mapping's pages stay resident
    assert grown["read_each"] < 250, grown


def test_read_each_reads_every_tensor_of_every_file(tmp_path):
    files = []
    for i, names in enumerate((["a.weight", "a.bias"], ["q", "s"])):
        files.append(Path(tmp_path / f"part{i}.safetensors"))
        save_file({n: TENSORS[n] for n in names}, str(files[-1]))
    got = {name: (tensor, file.name) for name, tensor, file in read_each(files)}
    assert {n: f for n, (_, f) in got.items()} == {
        "a.weight": "part0.safetensors",
        "a.bias": "part0.safetensors",
        "q": "part1.safetensors",
        "s": "part1.safetensors",
    }
    assert all(torch.equal(t, TENSORS[n]) for n, (t, _) in got.items())
