"""The benchmark tool: its FLOP counts against the official ones, its settings checks, and a
smoke run of the command at a tiny size (fields and their consistency, never speed)."""
import json
import os
import re
import subprocess
import sys
import types

import pytest

from conftest import REPO_ROOT
from yolov9_jax import bench


def _facts_fused_gflops(spec_dir):
  """{config: fused GFLOPs at 640} from FACTS.md §4.3's table (last column)."""
  table = {}
  for line in (spec_dir / "FACTS.md").read_text().splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 8 and re.fullmatch(r"(yolov9|gelan)-[tsmce]", cells[0]):
      table[cells[0]] = float(cells[7])
  return table


def test_official_flop_constants_are_the_specs(spec_dir):
  for name, gflops in bench.OFFICIAL_GFLOPS_640["train"].items():
    manifest = json.loads((spec_dir / "keys" / f"{name}.json").read_text())
    assert manifest["gflops_640"] == gflops, name
  fused = _facts_fused_gflops(spec_dir)
  assert len(fused) == 10
  for name, gflops in bench.OFFICIAL_GFLOPS_640["fused"].items():
    assert fused[name] == gflops, name


@pytest.mark.parametrize("model_name,fused,official", [
    ("yolov9-c", False, 239.88),  # the training graph, PGI's auxiliary branch included
    ("yolov9-c", True, 102.15),   # its folded main branch = gelan-c fused
    ("yolov9-t", False, 16.53),
])
def test_forward_flops_at_640_match_the_official_count(model_name, fused, official):
  """XLA's count skips convolution taps on padding, so it sits slightly below thop's (which also
  counts BatchNorm); 2 % would be missed by any wrong width, depth or stride."""
  gflops = bench.forward_gflops(model_name, 80, 640, fused=fused)
  assert official * 0.975 < gflops < official
  assert bench.official_gflops(model_name, 640, fused) == official


def test_peak_lookup_by_device_kind():
  kind = lambda name: types.SimpleNamespace(device_kind=name)
  assert bench.peak_tflops(kind("NVIDIA H100 80GB HBM3")) == 989.4
  assert bench.peak_tflops(kind("TPU v5 lite")) == 197.0   # v5e, not v5p
  assert bench.peak_tflops(kind("TPU v5p")) == 459.0
  assert bench.peak_tflops(kind("cpu")) is None
  assert bench.peak_tflops(kind("cpu"), override=0.5) == 0.5


@pytest.mark.parametrize("argv,message", [
    (["--benchmarks", "train,speed"], "unknown benchmarks"),
    (["--image_size", "100"], "multiple of 32"),
    (["--batch_size", "0"], "at least 1"),
])
def test_bad_settings_are_refused(argv, message, capsys):
  with pytest.raises(SystemExit):
    bench.parse_args(argv)
  assert message in capsys.readouterr().err


def test_a_program_larger_than_the_host_memory_is_refused_on_cpu():
  def compiled(temp_bytes):
    analysis = types.SimpleNamespace(argument_size_in_bytes=0, output_size_in_bytes=0,
                                     alias_size_in_bytes=0, temp_size_in_bytes=temp_bytes)
    return types.SimpleNamespace(memory_analysis=lambda: analysis)
  bench.check_fits_in_host_memory(compiled(2**20), "the train step")  # 1 MiB: fine
  with pytest.raises(SystemExit, match="the train step needs 65536.0 GiB .* lower --batch_size"):
    bench.check_fits_in_host_memory(compiled(2**46), "the train step")


def test_synthetic_batch_is_a_valid_training_batch():
  batch = bench.synthetic_batch(3, 64, max_boxes=10, boxes_per_image=4, num_classes=5)
  assert batch["images"].shape == (3, 64, 64, 3) and batch["images"].dtype.name == "uint8"
  assert batch["valid"].sum(1).tolist() == [4, 4, 4]
  boxes = batch["boxes"]
  assert (boxes[..., 2:] > boxes[..., :2]).all() and boxes.min() >= 0 and boxes.max() <= 64
  assert 0 <= batch["classes"].min() and batch["classes"].max() < 5


def test_the_command_reports_every_benchmark(tmp_path, a_subprocess_slot):
  """``python -m yolov9_jax.bench`` at 64 px, batch 2, one CPU device: one JSON line per
  benchmark with every field, rates that agree with each other, a profile of each, and the
  markdown table."""
  # -O0 halves the train step's compile time; this test never looks at speed.
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), XLA_FLAGS=(
      "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"))
  command = [sys.executable, "-m", "yolov9_jax.bench", "--model", "gelan-t", "--image_size", "64",
             "--batch_size", "2", "--num_classes", "3", "--max_boxes", "16", "--steps", "2",
             "--warmup", "1", "--workers", "1", "--peak_tflops", "0.1",
             "--data_dir", str(tmp_path / "datasets"), "--profile_dir", str(tmp_path / "profile"),
             "--compilation_cache", str(REPO_ROOT / ".cache" / "jax")]
  out = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  records = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["benchmark"] for r in records] == ["inference", "inference_nms", "train",
                                               "train_pipeline"]
  for r in records:
    assert (r["model"], r["batch_size"], r["image_size"], r["dtype"]) == ("gelan-t", 2, 64, "float32")
    assert (r["backend"], r["num_devices"], r["peak_tflops_per_device"]) == ("cpu", 1, 0.1)
    for field in ("images_per_second", "seconds_per_step", "compile_seconds",
                  "forward_gflops_per_image", "step_gflops_per_image", "memory_planned_bytes",
                  "official_gflops_per_image", "mfu"):
      assert r[field] > 0, (r["benchmark"], field)
    assert r["images_per_second"] == pytest.approx(2 / r["seconds_per_step"], rel=0.01)
    assert r["peak_memory_bytes"] is None  # the CPU backend keeps no device statistics
    model_flops = r["forward_gflops_per_image"] * (3 if r["benchmark"].startswith("train") else 1)
    assert r["mfu"] == pytest.approx(model_flops * 1e9 * r["images_per_second"] / 0.1e12, rel=0.01)
  inference, _, train, train_pipeline = records
  # The training program (forward, backward, loss, optimizer) does roughly 3x the forward work.
  assert 2.5 < train["step_gflops_per_image"] / train["forward_gflops_per_image"] < 5
  assert train["memory_planned_bytes"] > inference["memory_planned_bytes"]
  assert train_pipeline["compile_seconds"] == train["compile_seconds"]  # the same program
  for name in ("inference", "inference_nms", "train", "train_pipeline"):
    assert list((tmp_path / "profile" / name).rglob("*.xplane.pb")), name  # a jax.profiler trace
  table = out.stdout.split("\n\n")[-1].strip().splitlines()
  assert table[0].startswith("| benchmark | model |") and len(table) == 2 + len(records)
  assert "| train_pipeline | gelan-t | 2 | 64 | float32 | cpu |" in table[-1]


def test_the_input_pipeline_benchmark_prints_its_rates(tmp_path, every_subprocess_slot):
  done = subprocess.run(
      [sys.executable, str(REPO_ROOT / "benchmarks" / "input_pipeline.py"), "--images=8",
       "--batches=2", "--batch_size=4", "--max_workers=2"],
      capture_output=True, text=True, timeout=600, cwd=tmp_path,
      env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert done.returncode == 0, done.stderr[-3000:]
  record = json.loads(done.stdout.strip().splitlines()[-1])
  sweep = record["train_mosaic_by_workers"]
  assert list(sweep) == ["1", "2"] and sweep["1"]["scaling_efficiency"] == 1.0
  assert sweep["2"]["scaling_efficiency"] == pytest.approx(
      sweep["2"]["images_per_second"] / (2 * sweep["1"]["images_per_second"]), abs=0.002)
  for name in ("train_mosaic_official_partners_1_worker", "train_mosaic_ram_cache_1_worker",
               "eval_letterbox"):
    assert record[name]["images"] > 0 and record[name]["images_per_second"] > 0, name
  for rates in [*sweep.values(), record["eval_letterbox"]]:
    assert rates["images"] > 0 and rates["images_per_cpu_second"] > 0
