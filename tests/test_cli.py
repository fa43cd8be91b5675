"""Command line (python -m flashlib): generate streams and prints the breakdown; bad arguments are clear."""
import pytest

from flashlib.__main__ import EXIT_ERROR, EXIT_USAGE, main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_streams_tokens_and_prints_the_breakdown(capsys, tmp_path):
    code, out, _ = run(capsys, "generate", "--model", "relu-opt-smoke", "--prompt", "The king said",
                       "--max-new-tokens", "4", "--policy", "oracle", "--dram-budget", "none",
                       "--flash-root", str(tmp_path))
    assert code == 0
    assert "The king said" in out                                   # the streamer printed the text
    assert "io_ms" in out and "mem_ms" in out and "compute_ms" in out
    assert sum(" decode " in line for line in out.splitlines()) == 3 and " prefill " in out           # 4 new tokens: prefill + 3 decode steps
    assert "per decoded token" in out


@pytest.mark.parametrize("rows", ["2", "max"])
def test_smaller_matrices_and_read_buffer_still_generate(capsys, tmp_path, rows):
    code, out, _ = run(capsys, "generate", "--model", "relu-opt-smoke", "--prompt", "The king said",
                       "--max-new-tokens", "4", "--policy", "oracle", "--dram-budget", "none",
                       "--capacity-quantile", "0.5", "--read-buffer-rows", rows, "--flash-root", str(tmp_path))
    assert code == 0 and "per decoded token" in out


def test_too_small_a_budget_names_the_minimum(capsys, tmp_path):
    code, _, err = run(capsys, "generate", "--model", "relu-opt-smoke", "--prompt", "x", "--policy", "oracle",
                       "--dram-budget", "0.01", "--flash-root", str(tmp_path))
    assert code == EXIT_ERROR
    assert "minimum budget is" in err


@pytest.mark.parametrize("args, message", [
    (["--dram-budget", "-1"], "--dram-budget"),
    (["--dram-budget", "plenty"], "--dram-budget"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--window-k", "-2"], "--window-k"),
    (["--policy", "magic"], "--policy"),
    (["--density", "1.5"], "--density"),
    (["--capacity-quantile", "0"], "--capacity-quantile"),
    (["--read-buffer-rows", "0"], "--read-buffer-rows"),
])
def test_bad_arguments_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--prompt", "x", *args])
    assert e.value.code == EXIT_USAGE
    assert message in capsys.readouterr().err


def test_missing_prompt_and_command_are_usage_errors(capsys):
    for argv in (["generate"], []):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == EXIT_USAGE


def test_unknown_model_is_a_clear_error(capsys):
    code, _, err = run(capsys, "generate", "--model", "no-such-model-xyz", "--prompt", "x")
    assert code == EXIT_USAGE
    assert "cannot load model 'no-such-model-xyz'" in err


def test_bench_prints_the_tables_and_the_baselines(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "--model", "relu-opt-smoke", "--prompt-tokens", "8", "--new-tokens", "3",
                       "--repeats", "1", "--flash-root", str(tmp_path), "--baselines")
    assert code == 0
    assert "Table 2" in out and "Table 3" in out and "Dense in DRAM" in out
    assert "total_speedup_dense_bound" in out
    from flashlib.cgroup import cgroup_unavailable_reason
    why = cgroup_unavailable_reason()
    if why:                                   # the one honest outcome where no memory group can be made
        assert f"baselines skipped: {why}" in out
    else:
        assert "flashlib vs the page cache vs accelerate" in out and "flashlib_speedup" in out
        assert "pagecache" in out and "limit_mb" in out
