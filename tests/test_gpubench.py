"""The GPU row's prepared command: argument handling and a clean skip without CUDA; CUDA checks where a GPU is."""
import dataclasses

import numpy as np
import pytest
import torch

from flashlib import gpubench

NO_CUDA = not torch.cuda.is_available()


def test_arguments_are_parsed_and_checked():
    args = gpubench.parser().parse_args(["--out", "x", "--skip", "disk", "--skip", "paper", "--repeats", "3"])
    assert str(args.out) == "x" and args.skip == ["disk", "paper"] and args.repeats == 3 and args.paper_rounds == 2
    with pytest.raises(SystemExit):
        gpubench.parser().parse_args(["--skip", "everything", "--out", "x"])
    with pytest.raises(SystemExit):
        gpubench.parser().parse_args([])                       # --out is required


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a GPU: the command runs instead of skipping")
def test_without_cuda_it_skips_cleanly_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "gpu"
    assert gpubench.main(["--out", str(out)]) == 0
    assert "skipped: no CUDA device" in capsys.readouterr().out and not out.exists()


def test_the_gpu_table_puts_the_papers_gpu_rows_beside_ours():
    import pandas as pd
    s = pd.DataFrame({"method": ["naive", "bundling"], **{f"{c}_median": [10.0, 1.0] for c in
                                                           ("io_ms", "mem_ms", "compute_ms", "total_ms")}})
    t = gpubench.gpu_table3({"tiny": s})
    assert t["source"].tolist().count("paper (RTX 4090, bf16)") == 3 and {"Naive", "All"} <= set(t["method"])


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_engine_with_every_neuron_equals_dense_and_registers_its_buffer(tmp_path):
    from flashlib import engine as eng
    from flashlib.config import ENGINE
    from tiny_models import tiny_opt
    model = tiny_opt().to("cuda")
    ids = torch.tensor([[3, 7, 11, 2]], device="cuda")
    dense = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, pad_token_id=1)
    cfg = dataclasses.replace(ENGINE, policy="all", dram_budget=None, device="cuda", verify=False)
    with eng.SparseEngine(tiny_opt(), "tiny-cuda", cfg, flash_root=tmp_path) as e:
        assert e.flash.layers[0].matrix.matrix.device.type == "cuda"
        assert e.budget.used_bytes <= e.budget.budget_bytes
        got = e.generate(ids.cpu(), max_new_tokens=5, pad_token_id=1).tokens
        buf = e.buffer
    assert torch.equal(got, dense.cpu()) and e.buffer is None          # unregistered on close
    assert buf.nbytes > 0


@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_cuda_dense_streaming_equals_dense(tmp_path):
    from flashlib.streaming import StreamingBaseline
    from tiny_models import tiny_opt
    ids = torch.tensor([[3, 7, 11, 2]])
    dense = tiny_opt().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                pad_token_id=1)
    with StreamingBaseline(tiny_opt(), "tiny-cuda", 0.0, device="cuda", flash_root=tmp_path) as run:
        assert torch.equal(run.generate(ids, max_new_tokens=5, pad_token_id=1).tokens, dense)


@pytest.mark.slow
def test_a_cpu_dry_run_goes_through_every_step_and_writes_every_table(tmp_path):
    import json
    import pandas as pd
    out = tmp_path / "gpu"
    assert gpubench.main(["--out", str(out), "--device", "cpu", "--smoke", "--repeats", "1", "--new-tokens", "3",
                          "--paper-rounds", "1"]) == 0
    meta = json.loads((out / "gpu_device.json").read_text())
    assert meta["device"] == "cpu (dry run)" and meta["small_models"] == {"relu-opt-smoke": True}
    assert set(meta["disk_mbps"]) == {str(16 << 10), str(1 << 20)}
    t3 = pd.read_csv(out / "gpu_table3.csv")
    assert {"ours: relu-opt-smoke", "ours: OPT 6.7B geometry", "paper (RTX 4090, bf16)"} <= set(t3["source"])
    small = pd.read_csv(out / "gpu_relu-opt-smoke.csv")
    assert set(small["method"]) == set(gpubench.SMALL_METHODS) and (small["dtype"] == "bfloat16").all()
