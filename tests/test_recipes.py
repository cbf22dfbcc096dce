"""Recipe smoke tests: the autoencoder CLI end to end on tiny generated data, and plotting."""
import json

import pytest

from recipes import autoencoder
from recipes.plot import plot_results

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, optimizer, extra=()):
    (tmp_path / "cache").mkdir(exist_ok=True)
    argv = ["--optimizer", optimizer, "--max-iters", "2", "--time-budget", "0", "--train-size", "120",
            "--test-size", "40", "--batch-size", "60", "--curvature-batch-size", "30", "--cg-max-iters", "4",
            "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--no-progress", *extra]
    return autoencoder.main(argv)


@pytest.mark.parametrize("optimizer", ["hf", "adam", "sgd"])
def test_autoencoder_recipe_writes_json_and_png(tmp_path, optimizer):
    result = _run(tmp_path, optimizer)
    json_path = tmp_path / "out" / f"autoencoder_curves_{optimizer}_seed0.json"
    png_path = tmp_path / "out" / f"autoencoder_curves_{optimizer}_seed0.png"
    saved = json.loads(json_path.read_text())
    assert set(saved) == {"config", "history", "final"}
    assert saved["final"]["iterations"] == 2 and saved["final"]["status"] == "max_iters"
    assert saved["config"]["optimizer"] == optimizer
    rows = saved["history"]
    assert rows[0]["iter"] == 0 and rows[-1]["iter"] == 2
    for row in rows:
        assert {"iter", "time_s", "epoch", "train_loss", "train_error", "test_error"} <= set(row)
        assert row["train_error"] > 0 and row["test_error"] > 0
    assert rows[-1]["epoch"] == pytest.approx(2 * 60 / 120)
    assert result["final"]["train_error"] == rows[-1]["train_error"]
    data = png_path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 2000


def test_hf_recipe_reduces_the_training_error(tmp_path):
    result = _run(tmp_path, "hf", ["--max-iters", "4", "--damping", "1"])
    rows = result["history"]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert all("rho" in r for r in rows[1:-1] if r["iter"] > 0)


def test_help_states_the_default_time_budget():
    text = autoencoder.build_parser().format_help()
    assert f"{autoencoder.DEFAULT_TIME_BUDGET:.0f}" in text and "--full" in text


def test_full_flag_selects_the_paper_schedule():
    cfg = autoencoder._config(autoencoder.build_parser().parse_args(["--full"]))
    assert cfg["time_budget"] == 0 and cfg["cg_max_iters"] == 250 and cfg["batch_size"] == 0
    assert cfg["max_iters"] == 1000 and cfg["damping"] == 45 and cfg["cg_stop"] == "progress"
    opts = autoencoder.hf_options(cfg)
    assert opts["cg_stop"] == "progress" and opts["damping"].value == 45 and opts["preconditioner"].decay == 0
    # Without --full the recipe passes nothing it was not given: the library's defaults apply.
    assert autoencoder.hf_options(autoencoder._config(autoencoder.build_parser().parse_args([]))) == {}


def test_plot_several_results(tmp_path):
    paths = []
    for opt in ("hf", "adam"):
        _run(tmp_path, opt)
        paths.append(str(tmp_path / "out" / f"autoencoder_curves_{opt}_seed0.json"))
    out = plot_results(paths, str(tmp_path / "both.png"), title="both")
    assert out == str(tmp_path / "both.png")
    assert (tmp_path / "both.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_by_task_draws_one_panel_per_task_and_length(tmp_path, capsys):
    from recipes import plot

    def fake(task, T, optimizer, seed, errors):
        return {"config": {"task": task, "T": T, "optimizer": optimizer, "seed": seed, "clock": "cpu"},
                "history": [{"time_s": 60.0 * i, "test_error": e} for i, e in enumerate(errors)]}

    runs = [fake("xor", 100, "hf", 0, [1.0, 0.5, 0.0]), fake("xor", 100, "adam", 0, [1.0, 1.0]),
            fake("addition", 200, "hf", 0, [0.9, 0.2]), fake("addition", 100, "hf", 1, [0.9, 0.005])]
    paths = []
    for i, r in enumerate(runs):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(r))
    plot.main([*map(str, paths), "--by-task", "--out", str(tmp_path / "tasks.png")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "tasks.png")
    assert (tmp_path / "tasks.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="no results"):
        plot.plot_by_task([], tmp_path / "none.png")


def _autoencoder_under_torchrun(tmp_path, device: str) -> tuple[dict, dict]:
    """The recipe under ``torchrun --nproc_per_node=2 --distributed`` and in one process,
    both on ``device``: (rank 0's result, the single process's)."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(autoencoder.__file__).resolve()
    (tmp_path / "cache").mkdir()
    common = ["--max-iters", "2", "--time-budget", "0", "--train-size", "120", "--test-size", "40", "--batch-size",
              "60", "--curvature-batch-size", "30", "--cg-max-iters", "4", "--no-progress", "--threads", "1",
              "--data-dir", str(tmp_path / "cache"), "--device", device]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", str(script), "--distributed", "--out", str(tmp_path / "dist"), *common]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    dist_result = json.loads((tmp_path / "dist" / "autoencoder_curves_hf_seed0.json").read_text())
    return dist_result, autoencoder.main(["--out", str(tmp_path / "single"), *common])


def _check_torchrun_result(dist_result: dict, single: dict) -> None:
    assert dist_result["final"]["iterations"] == 2 and dist_result["config"]["distributed"]
    # Same data, same steps; only the curvature subset differs (15 cases from each shard).
    assert dist_result["final"]["train_error"] == pytest.approx(single["final"]["train_error"], rel=1e-2)
    assert dist_result["final"]["train_error"] < dist_result["history"][0]["train_error"]


def test_autoencoder_recipe_under_torchrun(tmp_path):
    """--distributed with 2 gloo processes: runs, rank 0 writes results close to one process's."""
    _check_torchrun_result(*_autoencoder_under_torchrun(tmp_path, "cpu"))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_autoencoder_recipe_under_torchrun_on_cuda(tmp_path):
    """torchrun --nproc_per_node=2 --distributed --device cuda: one GPU per process over
    NCCL where the machine has two, both processes on one GPU over gloo where it has one."""
    _check_torchrun_result(*_autoencoder_under_torchrun(tmp_path, "cuda"))


@pytest.mark.parametrize("device_type, local_rank, local_world, gpus, expected", [
    ("cpu", 1, 2, 0, (None, "gloo")),
    ("cuda", 0, 1, 1, (0, "nccl")),
    ("cuda", 3, 4, 8, (3, "nccl")),
    ("cuda", 1, 2, 1, (0, "gloo")),  # two processes share the one GPU
    ("cuda", 3, 4, 2, (1, "gloo")),  # round-robin
])
def test_distributed_placement_shares_gpus_over_gloo_when_there_are_fewer_than_processes(
        device_type, local_rank, local_world, gpus, expected):
    assert autoencoder.distributed_placement(device_type, local_rank, local_world, gpus) == expected


def test_distributed_placement_refuses_cuda_without_a_gpu():
    with pytest.raises(SystemExit, match="no CUDA device"):
        autoencoder.distributed_placement("cuda", 0, 2, 0)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["hf", "adam"])
def test_autoencoder_recipe_trains_on_cuda(tmp_path, optimizer):
    """A few updates on CUDA: the error falls; Adam is the fused kernel there."""
    result = autoencoder.main(["--device", "cuda", "--optimizer", optimizer, "--max-iters", "3", "--time-budget", "0",
                               "--train-size", "200", "--test-size", "50", "--batch-size", "100",
                               *(["--curvature-batch-size", "50"] if optimizer == "hf" else ["--lr", "1e-2"]),
                               "--no-progress", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert result["final"]["iterations"] == 3
    assert result["history"][-1]["train_error"] < result["history"][0]["train_error"]


def test_recipe_adam_is_fused_exactly_on_cuda():
    import torch

    model = torch.nn.Linear(3, 2)
    opt = autoencoder._optimizer({"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}, model)
    assert not opt.defaults["fused"]
    if torch.cuda.is_available():
        opt = autoencoder._optimizer({"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}, model.cuda())
        assert opt.defaults["fused"]


# -- the pathological RNN problems ---------------------------------------------------

@pytest.mark.parametrize("task", ["addition", "multiplication", "xor", "temporal_order", "temporal_order3",
                                  "random_permutation", "memorization"])
def test_rnn_task_generators_follow_the_definitions(task):
    import torch

    from recipes import rnn_pathological as rp

    b = rp.generate(task, 30, 64, torch.Generator().manual_seed(0))
    s = rp.spec(task)
    assert b.x.shape == (30, 64, s.inputs)
    if task in ("addition", "multiplication", "xor"):
        marks = b.x[:, :, 1]
        assert torch.all(marks.sum(0) == 2)
        assert torch.all(marks[:3].sum(0) == 1)  # the first mark in the first 10% of T = 30
        a, c = (b.x[:, :, 0] * marks).T[marks.T == 1].view(64, 2).T  # the two marked values, in order
        expected = {"addition": (a + c) / 2, "multiplication": a * c, "xor": (a != c).float()}[task]
        assert torch.allclose(b.y[:, 0], expected)
    elif task == "memorization":
        assert torch.equal(b.x[:10].argmax(-1).T, b.y) and torch.all(b.x[30 - 11].argmax(-1) == 5)
    elif task.startswith("temporal_order"):
        symbols = b.x.argmax(-1)
        k = 2 if task == "temporal_order" else 3
        where = (symbols < 2).T.nonzero()  # (sequence, step) of each X/Y, in order
        assert torch.all((symbols < 2).sum(0) == k)
        steps = where[:, 1].view(64, k)
        for j, (lo, hi) in enumerate(rp.ORDER_WINDOWS[k]):
            assert torch.all((steps[:, j] >= int(lo * 30)) & (steps[:, j] < max(int(hi * 30), int(lo * 30) + 1)))
        bits = symbols.T.gather(1, steps)  # 0 = X, 1 = Y, in time order
        assert torch.equal(b.y, sum(bits[:, j] << (k - 1 - j) for j in range(k)))
    else:
        assert b.y.shape == (64,) and int(b.y.max()) < s.outputs


def test_rnn_input_scale_keeps_early_inputs_visible_at_the_last_step():
    """At the paper's input scale the one-hot distractors saturate the units and an input
    85 steps back barely reaches the last state; scaled by 0.1 it does (why the temporal
    order runs use --input-scale 0.1)."""
    import torch

    from recipes import rnn_pathological as rp

    b = rp.generate("temporal_order", 100, 100, torch.Generator().manual_seed(1))
    reach = {}
    for scale in (1.0, 0.1):
        model = rp.sparse_init_rnn(6, 100, 4, torch.Generator().manual_seed(0), input_scale=scale)
        x = b.x.clone().requires_grad_(True)
        states, _ = rp.forward(model, x, readout=1)
        (g,) = torch.autograd.grad(states[-1].pow(2).sum(), x)
        reach[scale] = float(g[15].norm(dim=-1).mean())
    assert reach[1.0] < 1e-6 < 1e-2 < reach[0.1]
    with pytest.raises(ValueError, match="input_scale"):
        rp.sparse_init_rnn(6, 10, 4, torch.Generator(), input_scale=0.0)


def test_rnn_recipe_smoke(tmp_path):
    from recipes import rnn_pathological as rp

    for opt, extra in (("hf", ["--checkpoint", "--cg-max-iters", "5"]), ("adam", [])):
        result = rp.main(["--task", "temporal_order", "--T", "16", "--hidden", "12", "--optimizer", opt,
                          "--max-iters", "2", "--time-budget", "0", "--batch-size", "40", "--curvature-batch-size",
                          "20", "--test-size", "50", "--out", str(tmp_path), "--no-progress", *extra])
        stem = tmp_path / f"rnn_temporal_order_T16_{opt}_seed0"
        saved = json.loads(stem.with_suffix(".json").read_text())
        assert saved["final"]["iterations"] == 2 and saved["final"] == result["final"]
        assert 0 <= saved["final"]["test_error"] <= 1
        assert stem.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    assert "--task" in rp.build_parser().format_help()


def test_rnn_task_defaults_apply_unless_the_cli_overrides_them(tmp_path):
    from recipes import rnn_pathological as rp

    common = ["--T", "12", "--hidden", "6", "--max-iters", "1", "--time-budget", "0", "--cg-max-iters", "2",
              "--test-size", "20", "--out", str(tmp_path), "--no-progress", "--overwrite"]
    xor = rp.main(["--task", "xor", *common])["config"]
    assert (xor["batch_size"], xor["curvature_batch_size"], xor["cg_stop"]) == (16000, 1000, "rate")
    mine = rp.main(["--task", "xor", "--batch-size", "30", "--cg-stop", "progress", *common])["config"]
    assert (mine["batch_size"], mine["curvature_batch_size"], mine["cg_stop"]) == (30, 1000, "progress")
    other = rp.main(["--task", "addition", *common])["config"]
    assert (other["batch_size"], other["curvature_batch_size"], other["cg_stop"]) == (1000, 250, "progress")
    assert other["damping_min"] is None and xor["damping_min"] is None
    adam = rp.main(["--task", "xor", "--optimizer", "adam", *common])["config"]
    assert adam["batch_size"] == 100


@pytest.mark.parametrize("task, device, expected", [
    ("addition", "cpu", (1000, 250, "progress")),
    ("addition", "cuda", (4000, 1000, "progress")),
    ("temporal_order", "cuda:1", (4000, 1000, "progress")),
    ("xor", "cpu", (16000, 1000, "rate")),
    ("xor", "cuda", (16000, 1000, "rate")),
])
def test_rnn_hf_batches_follow_the_device_unless_given(task, device, expected):
    from recipes import rnn_pathological as rp

    d = rp.hf_batch_defaults(task, device)
    assert (d["batch_size"], d["curvature_batch_size"], d["cg_stop"]) == expected
    cfg = {"task": task, "device": device, "optimizer": "hf", "batch_size": 500, "curvature_batch_size": None,
           "cg_stop": None}
    rp._fill_defaults(cfg)
    assert (cfg["batch_size"], cfg["curvature_batch_size"]) == (500, expected[1])


def test_rnn_damping_floor_and_exact_hessian_options(tmp_path):
    from recipes import rnn_pathological as rp

    common = ["--task", "addition", "--T", "12", "--hidden", "6", "--max-iters", "6", "--time-budget", "0",
              "--batch-size", "40", "--curvature-batch-size", "20", "--test-size", "20",
              "--out", str(tmp_path), "--no-progress"]
    free = rp.main([*common, "--damping", "10", "--damping-min", "0"])
    floored = rp.main([*common, "--damping", "10", "--damping-min", "5", "--tag", "floor"])
    assert min(r["damping"] for r in free["history"] if "damping" in r) < 5  # λ does fall without the floor
    assert min(r["damping"] for r in floored["history"] if "damping" in r) == pytest.approx(5)
    hess = rp.main([*common, "--curvature", "hessian", "--mu", "0", "--tag", "hessian"])
    assert hess["config"]["curvature"] == "hessian" and hess["final"]["iterations"] == 6
    region = rp.main([*common, "--curvature", "hessian", "--mu", "0", "--trust-radius", "1e-3", "--tag", "tr"])
    assert region["config"]["trust_radius"] == 1e-3 and region["final"]["iterations"] == 6


@pytest.mark.parametrize("optimizer", ["hf", "adam"])
def test_rnn_resume_continues_bit_identically(tmp_path, optimizer):
    import torch

    from recipes import rnn_pathological as rp

    common = ["--task", "xor", "--T", "12", "--hidden", "6", "--time-budget", "0", "--optimizer", optimizer,
              "--batch-size", "40", "--curvature-batch-size", "20", "--cg-max-iters", "8", "--test-size", "20",
              "--no-progress"]
    whole = rp.main([*common, "--max-iters", "4", "--out", str(tmp_path / "whole")])
    rp.main([*common, "--max-iters", "2", "--out", str(tmp_path / "parts")])
    with pytest.raises(SystemExit, match="other settings for cg_max_iters"):
        rp.main([*common, "--cg-max-iters", "9", "--max-iters", "4", "--out", str(tmp_path / "parts"), "--resume"])
    resumed = rp.main([*common, "--max-iters", "4", "--out", str(tmp_path / "parts"), "--resume"])

    def trace(result):
        return [{k: v for k, v in row.items() if k != "time_s"} for row in result["history"]]

    assert len(resumed["history"]) == 5 and trace(resumed) == trace(whole)  # iterations 0..4, every value equal
    saved = json.loads((tmp_path / "parts" / f"rnn_xor_T12_{optimizer}_seed0.json").read_text())
    assert saved["final"]["iterations"] == 4
    state = tmp_path / "parts" / f"rnn_xor_T12_{optimizer}_seed0.pt"
    saved_state = torch.load(state, weights_only=False)
    torch.save(dict(saved_state, status="solved"), state)
    with pytest.raises(SystemExit, match="already solved"):
        rp.main([*common, "--max-iters", "6", "--out", str(tmp_path / "parts"), "--resume"])
    with pytest.raises(SystemExit, match="no saved state"):
        rp.main([*common, "--max-iters", "4", "--out", str(tmp_path / "elsewhere"), "--resume"])


def test_rnn_saddle_report_matches_the_dense_hessian(tmp_path):
    import torch

    from recipes import rnn_pathological as rp

    rp.main(["--task", "xor", "--T", "12", "--hidden", "3", "--max-iters", "2", "--time-budget", "0",
             "--batch-size", "30", "--curvature-batch-size", "10", "--test-size", "20", "--out", str(tmp_path),
             "--no-progress"])
    state = tmp_path / "rnn_xor_T12_hf_seed0.pt"
    report = rp.main(["--saddle", str(state)])
    n = 3 * 2 + 3 + 3 * 3 + 3 + 1  # input weights and bias, recurrent weights, readout weights and bias
    # With as many Lanczos steps as parameters the Ritz values are the eigenvalues: check them
    # against the dense Hessian of the same batch (the report's generator draws it after the
    # 16 gradient batches).
    saved = torch.load(state, weights_only=False)
    model = rp.sparse_init_rnn(2, 3, 1, torch.Generator().manual_seed(0)).double()
    model.load_state_dict(saved["model"])
    gen = torch.Generator().manual_seed(777)
    for _ in range(16):
        rp.generate("xor", 12, 30, gen)
    b = rp.generate("xor", 12, 30, gen)
    shapes = {k: p.shape for k, p in model.named_parameters()}

    def loss_of(flat):  # the tanh RNN written out again, independently of rp.forward
        w, i = {}, 0
        for name, shape in shapes.items():
            w[name] = flat[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        h = torch.zeros(b.x.shape[1], 3, dtype=torch.float64)
        for x_t in b.x.double():
            h = torch.tanh(x_t @ w["inp.weight"].T + w["inp.bias"] + h @ w["rec.weight"].T)
        z = h @ w["out.weight"].T + w["out.bias"]
        return torch.nn.functional.binary_cross_entropy_with_logits(z, b.y.double())

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, theta))
    exact = rp.saddle_report(state, lanczos_steps=n)
    assert exact["hessian_min"] == pytest.approx(float(eig[0]), rel=1e-6, abs=1e-9)
    assert exact["hessian_max"] == pytest.approx(float(eig[-1]), rel=1e-6)
    assert report["hessian_min"] <= report["hessian_max"] and report["noise"] > 0 and report["gradient"] >= 0
    # Along the smallest eigenvector the secant curvature at the smallest step is the eigenvalue
    # (finite differences, §7.2), and the signed step goes downhill where that curvature is negative.
    first = exact["along_negative"][0]
    assert first["step"] == rp.SADDLE_STEPS[0]
    assert first["curvature"] == pytest.approx(float(eig[0]), rel=1e-3, abs=1e-6)
    assert float(eig[0]) < 0 and first["batch_change"] < 0
    assert [row["step"] for row in report["along_negative"]] == list(rp.SADDLE_STEPS)


def test_rnn_recipe_writes_partial_results_and_stops_on_sigterm(tmp_path):
    import os
    import signal

    from recipes import rnn_pathological as rp

    cfg = vars(rp.build_parser().parse_args(
        ["--task", "addition", "--T", "12", "--hidden", "8", "--optimizer", "adam", "--max-iters", "50",
         "--time-budget", "0", "--test-size", "20", "--out", str(tmp_path)]))
    seen = []

    def on_evaluate(partial):
        seen.append(json.loads(json.dumps(partial)))  # what the CLI writes must be JSON
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # handled: stop after this update, keep the results

    before = signal.getsignal(signal.SIGTERM)
    result = rp.run(cfg, progress=False, on_evaluate=on_evaluate)
    assert result["final"]["status"] == "interrupted" and result["final"]["iterations"] == 3
    assert [p["final"]["status"] for p in seen] == ["running"] * 3
    assert [len(p["history"]) for p in seen] == [2, 3, 4]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back


def test_scientific_recipe_runs_every_optimizer_and_writes_one_plot(tmp_path):
    from recipes import scientific

    results = scientific.main(["--problem", "pinn", "--optimizer", "all", "--max-iters", "2", "--time-budget", "0",
                               "--out", str(tmp_path), "--no-progress"])
    assert [r["config"]["optimizer"] for r in results] == ["hf", "adam", "adam", "adam", "lbfgs"]
    assert [r["config"]["lr"] for r in results[1:4]] == list(scientific.ADAM_LRS)
    for r in results:
        assert r["final"]["iterations"] == 2 and r["final"]["test_error"] > 0
        assert {"iter", "time_s", "train_loss", "test_error"} <= set(r["history"][-1])
    assert results[0]["history"][-1]["train_loss"] < results[0]["history"][0]["train_loss"]  # HF steps on the PINN
    assert (tmp_path / "scientific_pinn_all.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "scientific_pinn_lbfgs.json").read_text())["config"]["score"] == "relative L2 error"
    table = scientific.summary_table(results, budgets=(0.0, 1e9))
    assert table.count("\n") == 1 + len(results) and "| hf |" in table and "adam lr 0.003" in table
    assert f"{results[-1]['final']['test_error']:.2e}" in table.splitlines()[-1]


def test_scientific_recipe_takes_the_number_of_points_and_the_plain_batched_closure(tmp_path):
    """``--points`` sizes the problem; ``--closure batched`` hands HF the closure a user writes
    (no ``jacobian`` attribute), whose J the optimizer reads off the graph once the
    objective is known to be deterministic: the later steps are exact residual-space steps."""
    from recipes import scientific

    (r,) = scientific.main(["--problem", "reaction_diffusion", "--points", "60", "--width", "16",
                            "--closure", "batched", "--optimizer", "hf", "--max-iters", "6", "--time-budget", "0",
                            "--eval-every", "1e-9", "--out", str(tmp_path), "--no-progress"])
    assert r["config"]["points"] == 60 and r["config"]["closure"] == "batched"
    solvers = [h.get("solver") for h in r["history"] if h.get("solver")]
    assert solvers[0] == "cg" and solvers[-1] == "residual"


def test_scientific_recipe_redraws_the_benchmark_points_when_asked(tmp_path, capsys):
    """``--resample-every 1`` on a Dangel et al. instance draws its points afresh every update
    (their heat runs' setting): the optimizer then measures a stochastic objective and keeps
    to the exact step (damped there: tests/test_dense.py); on a problem without that setting
    the option is refused."""
    from recipes import scientific

    (r,) = scientific.main(["--problem", "poisson2d_257", "--resample-every", "1", "--optimizer", "hf",
                            "--max-iters", "4", "--time-budget", "0", "--eval-every", "1e-9",
                            "--out", str(tmp_path), "--no-progress"])
    assert r["history"][-1]["regime"] == "stochastic" and r["history"][-1]["solver"] == "dense"
    with pytest.raises(SystemExit):
        scientific.main(["--problem", "pinn", "--resample-every", "2", "--optimizer", "hf", "--max-iters", "1",
                         "--time-budget", "0", "--out", str(tmp_path), "--no-progress"])
    assert "--resample-every applies to Dangel et al.'s problems" in capsys.readouterr().err


def test_scientific_problems_score_the_exact_solution_as_zero():
    import math

    import torch

    from recipes import scientific

    pinn = scientific.Poisson(n_interior=50, n_boundary=20, grid=11)

    class Exact(torch.nn.Module):
        def forward(self, x):
            return (torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])).unsqueeze(-1)

    assert pinn.score(Exact()) < 1e-15
    assert float(pinn.residuals(Exact()).abs().max()) < 1e-10  # −Δu* = f and u* = 0 on the boundary
    reg = scientific.Regression(n_train=20, n_test=20)

    class Target(torch.nn.Module):
        def forward(self, x):
            return scientific.Regression.target(x).unsqueeze(-1)

    assert reg.score(Target()) == 0.0
    rd = scientific.ReactionDiffusion(n_interior=40, n_initial=10, n_boundary=10, grid=11)

    class Decaying(torch.nn.Module):  # u* = e^{-t} sin(πx)
        def forward(self, xt):
            return (torch.exp(-xt[:, 1]) * torch.sin(math.pi * xt[:, 0])).unsqueeze(-1)

    assert rd.score(Decaying()) < 1e-15
    assert float(rd.residuals(Decaying()).detach().abs().max()) < 1e-12  # the PDE, initial and boundary conditions
    nls = scientific.Schrodinger(n_interior=40, n_initial=10, n_boundary=10, grid=11)

    class Soliton(torch.nn.Module):  # h* = sech(x) e^{it/2}
        def forward(self, xt):
            return scientific.Schrodinger.exact(xt)

    assert nls.score(Soliton()) == 0.0
    assert float(nls.residuals(Soliton()).detach().abs().max()) < 1e-12  # both equations, initial and boundary values


def test_scientific_recipe_solves_a_system_with_the_jacobian_read_term_by_term(tmp_path):
    """The Schrödinger system (two outputs per point, a plain batched closure): once the
    objective is deterministic HF takes the exact step in residual space (880 outputs, 1,218
    parameters), which needs J: read off the graph, colour by colour."""
    from recipes import scientific

    (r,) = scientific.main(["--problem", "schrodinger", "--points", "40", "--width", "32",
                            "--optimizer", "hf", "--max-iters", "4", "--time-budget", "0",
                            "--eval-every", "1e-9", "--out", str(tmp_path), "--no-progress"])
    solvers = [h.get("solver") for h in r["history"] if h.get("solver")]
    assert solvers[0] == "cg" and solvers[-1] == "residual"
    assert r["history"][-1]["test_error"] < r["history"][0]["test_error"]


@pytest.mark.parametrize("argv, message", [
    (["--batch-size", "-5"], "--batch-size must be >= 0"),
    (["--cg-max-iters", "0"], "--cg-max-iters must be > 0"),
    (["--device", "cuda:0"], "CUDA is not available"),
])
def test_recipe_arguments_are_validated_with_the_option_named(argv, message, capsys):
    if "cuda:0" in argv:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit):
        autoencoder.main(argv + ["--no-progress"])
    assert message in capsys.readouterr().err


def test_out_may_name_a_json_file_but_not_an_existing_directory(tmp_path):
    target = tmp_path / "run.json"
    _run(tmp_path, "adam", ["--out", str(target)])
    assert json.loads(target.read_text())["final"]["iterations"] == 2
    assert target.with_suffix(".png").read_bytes().startswith(PNG_MAGIC)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(SystemExit, match="directory"):
        _run(tmp_path, "adam", ["--out", str(tmp_path / "dir.json")])


def test_rnn_task_all_runs_every_combination_and_summarises(tmp_path):
    from recipes import rnn_pathological as rp

    common = ["--T", "16", "--hidden", "8", "--max-iters", "2", "--time-budget", "0", "--batch-size", "40",
              "--curvature-batch-size", "20", "--test-size", "50", "--out", str(tmp_path), "--no-progress"]
    results = rp.main(["--task", "all", "--tasks", "memorization", "--seeds", "0", "1", "--jobs", "2", *common])
    assert len(results) == 4  # 2 optimizers x 2 seeds, one JSON each
    table = (tmp_path / "summary.md").read_text()
    assert "| memorization | 16 | 0/2 |" in table
    assert (tmp_path / "summary.png").stat().st_size > 0
    # A second call finds every run finished and only rebuilds the summary.
    before = {p.name: p.stat().st_mtime for p in tmp_path.glob("rnn_*.json")}
    rp.main(["--task", "all", "--tasks", "memorization", "--seeds", "0", "1", *common])
    assert before == {p.name: p.stat().st_mtime for p in tmp_path.glob("rnn_*.json")}
    # A larger budget continues every run from its saved state: the first updates are kept.
    longer = rp.main(["--task", "all", "--tasks", "memorization", "--seeds", "0", "1", *common, "--max-iters", "3"])
    first = {(r["config"]["optimizer"], r["config"]["seed"]): r["history"][:3] for r in results}
    assert all(r["final"]["iterations"] == 3 and r["config"]["resume"] for r in longer)
    assert all(r["history"][:3] == first[(r["config"]["optimizer"], r["config"]["seed"])] for r in longer)


def test_rnn_task_all_tunes_the_learning_rate_first(tmp_path):
    from recipes import rnn_pathological as rp

    common = ["--T", "16", "--hidden", "8", "--max-iters", "2", "--time-budget", "0", "--batch-size", "40",
              "--test-size", "50", "--out", str(tmp_path), "--no-progress"]
    call = ["--task", "all", "--tasks", "memorization", "--optimizers", "adam", "--seeds", "0", "1",
            "--lrs", "1e-3", "0.3", "--tune-budget", "0", *common]
    results = rp.main(call)
    tuning = [json.loads(p.read_text()) for p in sorted((tmp_path / "tune").glob("*.json"))]
    assert sorted(r["config"]["lr"] for r in tuning) == [1e-3, 0.3]
    assert all(r["config"]["seed"] == 0 and r["final"]["iterations"] == 2 for r in tuning)
    chosen = rp.pick_lr(tuning)
    assert [r["config"]["lr"] for r in results] == [chosen, chosen]  # every seed at the chosen rate
    table = (tmp_path / "tune.md").read_text()
    assert table.count("| yes |") == 1 and f"| memorization | adam | {chosen:g} |" in table
    assert f"(lr {chosen:g})" in (tmp_path / "summary.md").read_text()
    before = {p: p.stat().st_mtime for p in tmp_path.rglob("rnn_*.json")}
    rp.main(call)  # everything finished: nothing runs again
    assert before == {p: p.stat().st_mtime for p in tmp_path.rglob("rnn_*.json")}
    with pytest.raises(SystemExit, match="leave out --lr"):
        rp.main(call + ["--lr", "0.1"])


def test_rnn_pick_lr_prefers_the_earliest_solve_then_the_lowest_loss():
    from recipes import rnn_pathological as rp

    def run(lr, status, t, loss):
        return {"config": {"lr": lr}, "final": {"status": status, "time_s": t, "test_loss": loss}}

    assert rp.pick_lr([run(1e-3, "budget", 300, 0.01), run(3e-3, "solved", 240, 0.05),
                       run(1e-2, "solved", 120, 0.07)]) == 1e-2
    assert rp.pick_lr([run(1e-3, "budget", 300, 0.2), run(3e-3, "budget", 300, 0.1)]) == 3e-3
    assert rp.pick_lr([run(1e-3, "budget", 300, 0.6), run(3e-3, "diverged", 30, 0.0),
                       run(1e-2, "budget", 300, float("nan"))]) == 1e-3
    with pytest.raises(ValueError):
        rp.pick_lr([])


def test_rnn_summary_counts_solved_seeds_and_median_time():
    from recipes import rnn_pathological as rp

    def run(opt, seed, status, t, n):
        return {"config": {"task": "addition", "T": 100, "optimizer": opt, "seed": seed},
                "final": {"status": status, "time_s": t, "iterations": n, "test_error": 0.0 if status == "solved" else 0.5},
                "history": []}

    table = rp.summarize([run("hf", 0, "solved", 100, 10), run("hf", 1, "solved", 300, 30), run("hf", 2, "solved", 200, 20),
                          run("adam", 0, "budget", 3600, 9000)])
    assert "| addition | 100 | 3/3 | 200 s, 20 | 0/1 | none in 3,600 s (final test error 0.500) | solved |" in table
    # a run that came close and fell back names the lowest error it reached
    close = run("adam", 1, "budget", 3000, 8000)
    close["history"] = [{"test_error": 0.7}, {"test_error": 0.154}, {"test_error": None}, {"test_error": 0.722}]
    table = rp.summarize([run("hf", 0, "solved", 100, 10), run("adam", 0, "budget", 3600, 9000), close])
    assert "| 0/2 | none in 3,600 s (final test error 0.500; lowest on the way 0.154) |" in table
    # the median runs over every seed: two solved of three give the slower solve,
    # one solved of three gives no median time
    table = rp.summarize([run("hf", 0, "solved", 100, 10), run("hf", 1, "budget", 3600, 99), run("hf", 2, "solved", 300, 30),
                          run("adam", 0, "budget", 3600, 9000), run("adam", 1, "solved", 1560, 5000),
                          run("adam", 2, "budget", 3600, 9100)])
    assert "| addition | 100 | 2/3 | 300 s, 30 | 1/3 | median seed unsolved; solved at 1,560 s (5,000) | solved |" in table
    # time and updates come from the same seed (here the faster seed took more updates)
    table = rp.summarize([run("hf", 0, "solved", 136, 11), run("hf", 1, "solved", 270, 20), run("hf", 2, "solved", 384, 16)])
    assert "| addition | 100 | 3/3 | 270 s, 20 |" in table


def test_hf_vs_adam_benchmark_job_and_report():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import hf_vs_adam as bench

    hf = bench.run_job("manifold", "hf", budgets=[0.3, 0.6],
                       hf_options={"batch": 200, "curvature_batch": 50, "cg_max_iters": 3})
    adam = bench.run_job("manifold", "adam", budgets=[0.3, 0.6], lr=1e-3)
    assert [c["budget_s"] for c in hf["checkpoints"]] == [0.3, 0.6]
    assert hf["checkpoints"][-1]["cpu_s"] >= 0.6 and hf["checkpoints"][-1]["cg_per_update"] <= 3
    assert adam["checkpoints"][-1]["train_error"] < adam["checkpoints"][0]["train_error"] * 1.5
    text = bench.report([hf, adam])
    assert "best Adam (lr)" in text and "×" in text
    assert bench.parse_hf_options(["cg_max_iters=10", "preconditioner=identity", "backtracking_factor=None"]) == \
        {"cg_max_iters": 10, "preconditioner": "identity", "backtracking_factor": None}
    import torch

    import torch_hf

    params = [torch.nn.Parameter(torch.zeros(2))]
    kfac = bench.build_hf(params, bench.parse_hf_options(["preconditioner=kfac", "kfac_inverse_every=5"]))
    assert isinstance(kfac.preconditioner, torch_hf.preconditioners.KFAC)
    assert (kfac.preconditioner.decay, kfac.preconditioner.inverse_every) == (0.95, 5)
    ggn = bench.build_hf(params, bench.parse_hf_options(["preconditioner=ggn"]))
    assert ggn.preconditioner.decay == 0.0


def test_gpu_curves_benchmark_sets_hf_against_adam_at_its_equal_time_update_count(tmp_path):
    """benchmarks/gpu_curves.py: Adam's rate from the last three quarters of a probe, the
    grid run to rate × budget updates (a stage apart from the solo runs), HF read at or
    before each budget, and the ratio to the best Adam."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks import gpu_curves as bench

    history = [{"iter": 0, "time_s": 0.0}, {"iter": 5, "time_s": 1.0}, {"iter": 25, "time_s": 2.0},
               {"iter": 45, "time_s": 3.0}, {"iter": 65, "time_s": 4.0}]
    assert bench.steady_rate(history) == pytest.approx(20.0)  # warm-up before 1 s left out
    assert bench.row_at_time(history, 2.5)["iter"] == 25 and bench.row_at_time(history, 2.0)["iter"] == 25
    assert bench.row_at_updates(history, 40)["iter"] == 45
    with pytest.raises(ValueError, match="before"):
        bench.row_at_time(history[1:], 0.5)

    common = ["--device", "cpu", "--budgets", "0.5", "1", "--probe-seconds", "0.5", "--eval-every", "0.2",
              "--train-size", "200", "--test-size", "50", "--hf-batch", "100", "--hf-curvature-batch", "25",
              "--adam-batches", "50", "--adam-lrs", "1e-3", "1e-2", "--parallel", "2",
              "--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="solo stage"):
        bench.main(["--stage", "grid", *common])
    assert bench.main(["--stage", "solo", *common])["adam_rates"][50] > 0
    summary = bench.main(["--stage", "grid", *common])
    rate = summary["adam_rates"][50]
    assert [e["budget_s"] for e in summary["budget_rows"]] == [0.5, 1.0]
    for tag, cfg in summary["adam"].items():
        assert cfg["updates"] == cfg["target_updates"] == math.ceil(rate * 1.0)
    last = summary["budget_rows"][-1]
    # the evaluation nearest to rate × 1 s: the final one, at ceil(rate), is less than one update away
    assert last["hf_time_s"] <= 1.0 and abs(last["adam"][last["best_adam"]]["updates"] - rate) < 1
    assert last["ratio_hf_over_best_adam"] == pytest.approx(
        last["hf_train_error"] / min(a["train_error"] for a in last["adam"].values()))
    assert (tmp_path / "out" / "summary.json").exists() and (tmp_path / "out" / "curves.png").exists()


@pytest.mark.parametrize("task", ["addition", "xor", "temporal_order", "random_permutation", "memorization"])
def test_rnn_default_input_scale_lets_early_inputs_reach_the_last_state(task):
    """The recipe's default input scale (0.1) against the paper's N(0, 1) input weights: the
    sensitivity of the last state to the input 95 steps earlier (seed 0, T = 100)."""
    from recipes import rnn_pathological as rp

    reach = {scale: rp.input_reach(task, scale, seed=0) for scale in (1.0, rp.DEFAULT_INPUT_SCALE)}
    assert rp.DEFAULT_INPUT_SCALE == 0.1
    assert reach[0.1] > 0.1 and reach[0.1] > 100 * reach[1.0]


def _flushing_subnormals() -> bool:
    from torch_hf.optimizer import _flushing_denormals

    return _flushing_denormals()


@pytest.fixture
def flush_supported():
    import torch

    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush subnormals")


def test_subnormals_flushed_restores_the_callers_mode(flush_supported):
    import torch

    from recipes.runner import subnormals_flushed

    with subnormals_flushed(True) as on:
        assert on and _flushing_subnormals()
    assert not _flushing_subnormals()
    with subnormals_flushed(False) as on:
        assert not on and not _flushing_subnormals()
    torch.set_flush_denormal(True)
    try:
        with subnormals_flushed(True) as on:
            assert on
        assert _flushing_subnormals()  # the caller had it on: left on
    finally:
        torch.set_flush_denormal(False)


@pytest.mark.parametrize("keep", [False, True])
def test_rnn_recipe_trains_every_optimizer_with_subnormals_flushed_unless_kept(tmp_path, keep, flush_supported):
    from recipes import rnn_pathological as rp

    argv = ["--task", "temporal_order", "--T", "12", "--hidden", "8", "--optimizer", "adam", "--max-iters", "3",
            "--time-budget", "0", "--eval-every", "1e-9", "--test-size", "20", "--out", str(tmp_path),
            "--no-progress"] + (["--keep-subnormals"] if keep else [])
    cfg = vars(rp.build_parser().parse_args(argv))
    seen = []  # the mode while Adam trains, read at every evaluation
    result = rp.run(cfg, progress=False, on_evaluate=lambda partial: seen.append(_flushing_subnormals()))
    assert seen and set(seen) == {not keep}
    assert result["final"]["subnormals_flushed"] is (not keep)
    assert not _flushing_subnormals()


@pytest.mark.parametrize("recipe", ["autoencoder", "scientific"])
def test_other_recipes_flush_subnormals_unless_kept(tmp_path, recipe, flush_supported):
    from recipes import scientific

    for keep in (False, True):
        extra = ["--keep-subnormals", "--overwrite"] if keep else []
        if recipe == "autoencoder":
            final = _run(tmp_path, "adam", extra)["final"]
        else:
            final = scientific.main(["--problem", "regression", "--optimizer", "adam", "--max-iters", "2",
                                     "--time-budget", "0", "--out", str(tmp_path), "--no-progress", *extra])[0]["final"]
        assert final["subnormals_flushed"] is (not keep)
        assert not _flushing_subnormals()


def test_subnormals_benchmark_times_an_adam_update_from_a_saved_rnn_run(tmp_path, capsys, flush_supported):
    from benchmarks.subnormals import rnn_adam_update
    from recipes import rnn_pathological as rp

    for opt in ("adam", "hf"):
        rp.main(["--task", "temporal_order", "--T", "12", "--hidden", "8", "--optimizer", opt, "--max-iters", "2",
                 "--time-budget", "0", "--eval-every", "1e-9", "--batch-size", "20", "--curvature-batch-size", "10",
                 "--test-size", "20", "--out", str(tmp_path), "--no-progress"])
    out = rnn_adam_update(str(tmp_path / "rnn_temporal_order_T12_adam_seed0.pt"), reps=1, batch=8)
    assert out["rnn adam update, subnormals"] > 0 and out["rnn adam update, flushed"] > 0
    assert out["rnn adam update ratio"] > 0 and "ratio" in capsys.readouterr().out
    assert not _flushing_subnormals()
    with pytest.raises(SystemExit, match="saved Adam run"):
        rnn_adam_update(str(tmp_path / "rnn_temporal_order_T12_hf_seed0.pt"), reps=1)


# -- what the recipes tell their user -------------------------------------------------

def test_a_curvature_batch_larger_than_the_gradient_batch_is_refused_not_clamped(tmp_path, capsys):
    from recipes import rnn_pathological as rp

    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "hf", ["--batch-size", "60", "--curvature-batch-size", "100"])
    assert exc.value.code == 2
    assert "--curvature-batch-size 100 is larger than the gradient batch (60)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran or was written
    with pytest.raises(SystemExit):
        rp.main(["--task", "addition", "--T", "12", "--batch-size", "20", "--curvature-batch-size", "40",
                 "--max-iters", "1", "--out", str(tmp_path / "rnn"), "--no-progress"])
    assert "larger than the gradient batch (20)" in capsys.readouterr().err
    # the size used is what the JSON records
    saved = _run(tmp_path, "hf", ["--batch-size", "40", "--curvature-batch-size", "20"])["config"]
    assert (saved["gradient_batch"], saved["curvature_batch"], saved["curvature_batch_size"]) == (40, 20, 20)


def test_recipes_do_not_overwrite_earlier_results_without_overwrite(tmp_path, capsys):
    from recipes import scientific

    first = _run(tmp_path, "adam")
    json_path = tmp_path / "out" / "autoencoder_curves_adam_seed0.json"
    before = json_path.read_text()
    with pytest.raises(SystemExit) as exc:
        _run(tmp_path, "adam")
    assert exc.value.code == 2 and "exists from an earlier run" in capsys.readouterr().err
    assert json_path.read_text() == before
    again = _run(tmp_path, "adam", ["--overwrite"])
    assert again["final"]["iterations"] == first["final"]["iterations"]
    _run(tmp_path, "adam", ["--tag", "second"])  # a new name writes beside it
    assert (tmp_path / "out" / "autoencoder_curves_adam_seed0_second.json").exists()
    argv = ["--problem", "regression", "--optimizer", "adam", "--max-iters", "1", "--time-budget", "0",
            "--out", str(tmp_path / "sci"), "--no-progress"]
    scientific.main(argv)
    with pytest.raises(SystemExit):
        scientific.main(argv)


def test_data_dir_mistakes_are_one_line_cli_errors(tmp_path, capsys):
    for argv, says in ((["--dataset", "mnist", "--data-dir", str(tmp_path / "none")], "train-images-idx3-ubyte"),
                       (["--dataset", "mnist"], "needs --data-dir"),
                       (["--data-dir", str(tmp_path / "none")], "no such directory")):
        with pytest.raises(SystemExit) as exc:
            autoencoder.main(argv + ["--max-iters", "1", "--out", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and says in err and "Traceback" not in err
    assert not (tmp_path / "none").exists()  # the CURVES cache is not created at a mistyped path


def test_an_rnn_run_says_whether_it_solved_the_task_and_by_what_criterion(tmp_path, capsys):
    from recipes import rnn_pathological as rp

    rp.main(["--task", "addition", "--T", "12", "--hidden", "4", "--max-iters", "1", "--time-budget", "0",
             "--batch-size", "20", "--curvature-batch-size", "10", "--cg-max-iters", "2", "--test-size", "20",
             "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "not solved: test error" in out and "needs < 0.01" in out
    assert rp.outcome({"status": "solved", "solved_at_s": 12.0, "test_error": 0.004}).startswith("solved at 12 s")


def test_the_time_report_explains_a_budget_overrun_and_the_time_not_counted():
    from recipes.cli import time_report

    text = time_report({"time_s": 37.2, "last_update_s": 11.0, "evaluation_s": 3.0, "elapsed_s": 45.0}, 30, "cpu")
    assert "37 s of training (CPU time), 7 s past the 30 s budget: an update is never cut short" in text
    assert "the last one took 11 s" in text and "3 s of evaluation" in text and "45 s wall time" in text
    assert "past" not in time_report({"time_s": 30.4, "evaluation_s": 1.0}, 30, "wall")


def test_plots_label_what_they_draw(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from recipes import scientific

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    _run(tmp_path, "adam")
    left, right = figures[-1].axes
    assert left.get_ylabel() == "train error (solid), test error (dashed)" and right.get_xlabel() == "epochs"
    scientific.main(["--problem", "pinn", "--optimizer", "hf", "--max-iters", "2", "--time-budget", "0",
                     "--out", str(tmp_path / "sci"), "--no-progress"])
    left, right = figures[-1].axes
    assert left.get_ylabel() == "relative L2 error" and right.get_xlabel() == "updates"
    assert left.get_xlabel() == "training CPU time (s)"


def test_scientific_recipe_passes_hfs_cg_rule_and_initial_damping(tmp_path):
    from recipes import scientific

    (result,) = scientific.main(["--problem", "regression", "--optimizer", "hf", "--cg-stop", "rate", "--damping",
                                 "0.01", "--max-iters", "1", "--time-budget", "0", "--out", str(tmp_path),
                                 "--no-progress"])
    assert (tmp_path / "scientific_regression_hf_rate_lambda0.01.json").exists()
    assert result["config"]["cg_stop"] == "rate" and result["history"][-1]["damping"] == 0.01


def test_a_data_seed_draws_another_instance_of_a_published_pinn_problem(tmp_path):
    """--data-seed: the same network (theirs), other points; the same seed, the same points."""
    import torch

    from recipes import pinns, scientific

    theirs, other, again = (pinns.DangelPoisson("mlp-tanh-64", data_seed=s) for s in (None, 2, 2))
    assert torch.equal(theirs.model()[0].weight, other.model()[0].weight)
    assert not torch.equal(theirs.x_int, other.x_int) and not torch.equal(theirs.x_eval, other.x_eval)
    assert torch.equal(other.x_int, again.x_int) and torch.equal(other.x_bnd, again.x_bnd)
    result = scientific.main(["--problem", "poisson2d_257", "--optimizer", "hf", "--max-iters", "1",
                              "--time-budget", "0", "--data-seed", "2", "--out", str(tmp_path), "--no-progress"])
    assert (tmp_path / "scientific_poisson2d_257_hf_data2.json").exists()
    assert result[0]["config"]["data_seed"] == 2
    with pytest.raises(SystemExit):
        scientific.main(["--problem", "pinn", "--data-seed", "2", "--max-iters", "1", "--no-progress"])


def test_exact_targets_are_the_same_points_targets_in_float64():
    """--exact-targets: their points, the targets computed in float64; theirs differ from
    them by float32 rounding (sin(float32(π)) ≈ −8.7e-8 on the faces x = 1 and y = 1)."""
    import math

    import torch

    from recipes import pinns

    theirs, exact = pinns.DangelPoisson("mlp-tanh-64"), pinns.DangelPoisson("mlp-tanh-64", exact_targets=True)
    assert torch.equal(theirs.x_int, exact.x_int) and torch.equal(theirs.x_bnd, exact.x_bnd)
    u = torch.prod(torch.sin(math.pi * exact.x_bnd), 1)
    assert torch.equal(exact.g_bnd, u) and torch.equal(exact.f_int, 2 * math.pi ** 2 * torch.prod(
        torch.sin(math.pi * exact.x_int), 1))
    gap = (theirs.g_bnd - exact.g_bnd).abs().max()
    assert 5e-8 < float(gap) < 1e-7 and 1e-7 < float((theirs.f_int - exact.f_int).abs().max()) < 1e-5
    heat = pinns.DangelHeat("mlp-tanh-64", n_interior=30, n_boundary=20, exact_targets=True)
    assert torch.equal(heat.g_bnd, heat.exact(heat.x_bnd))


def test_the_data_floor_of_a_published_poisson_instance_is_its_float32_targets():
    """benchmarks/pinn_data_floor.py: the exact least-squares fit of the benchmark's loss over
    polynomials holds u* to ~1e-12 with float64 targets; the instance's float32 targets leave
    an error near the published ENGD figure (6.2e-8) that no optimizer's fit removes."""
    from benchmarks import pinn_data_floor as floor

    (row,) = floor.main(["--degrees", "15"])
    assert row["coefficients"] == 256
    assert row["float64"][1] < 1e-10 and row["float64"][0] < 1e-20
    assert 3e-8 < row["float32"][1] < 2e-7 and row["float32"][0] > 1e-13


def test_the_published_pinn_benchmark_instances_are_rebuilt_as_their_repository_draws_them():
    """recipes/pinns.py: the network under seed 1 in float32, then the points from the global
    stream as it continues (their train.py), the exact solution scoring ~0 on the float32 targets."""
    import math

    import torch

    from recipes import pinns

    problem = pinns.DangelPoisson("mlp-tanh-64")
    assert sum(p.numel() for p in problem.model().parameters()) == 257
    torch.manual_seed(1)
    reference = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    assert torch.equal(reference[0].weight.double(), problem.model()[0].weight)
    x = torch.rand(900, 2)  # the global stream after the initialisation: their interior points
    assert torch.equal(problem.x_int, x.double())
    assert problem.x_eval.shape == (9000, 2)
    on_face = ((problem.x_bnd == 0) | (problem.x_bnd == 1)).any(1)
    assert bool(on_face.all())

    class Exact(torch.nn.Module):
        def forward(self, x):
            return torch.prod(torch.sin(math.pi * x), 1, keepdim=True)

    assert problem.score(Exact()) < 1e-15
    r = problem.loss(Exact())[1]
    assert float(r.detach().abs().max()) < 1e-5  # the targets are float32, as theirs

    heat = pinns.DangelHeat("mlp-tanh-64")
    assert heat.x_int.shape == (3000, 5) and heat.x_bnd.shape == (500, 5)
    assert bool((heat.x_bnd[250:, 0] == 0).all())  # the initial condition at t = 0

    class Decaying(torch.nn.Module):  # u* = e^{-t} Σ sin(2 x_i)
        def forward(self, x):
            return (torch.exp(-x[:, :1]) * torch.sin(2 * x[:, 1:]).sum(1, keepdim=True))

    assert heat.score(Decaying()) < 1e-15
    assert float(heat.loss(Decaying())[1].detach().abs().max()) < 1e-5
    before = heat.x_int.clone()
    heat.advance()
    assert torch.equal(heat.x_int, before)  # the first step uses the first draw
    heat.advance()
    assert not torch.equal(heat.x_int, before)  # resampled every step (their HF run's batch_frequency 1)


def test_the_benchmark_problems_give_their_residuals_point_by_point_and_hf_solves_in_residual_space(tmp_path):
    """pinns.py's pointwise closures are the batched ones (with their Jacobian), and on a
    network with more parameters than residuals the recipe's HF takes the residual-space step."""
    import json

    import torch

    from recipes import pinns, scientific

    for problem in (pinns.DangelPoisson("mlp-tanh-64"), pinns.DangelHeat("mlp-tanh-64", n_interior=40, n_boundary=20)):
        model = problem.model()
        pointwise = problem.pointwise(model)
        assert torch.allclose(pointwise()[1].detach(), problem.loss(model)[1].detach(), rtol=0, atol=1e-12)
        assert pointwise.jacobian().shape == (len(pointwise()[1]), sum(p.numel() for p in model.parameters()))
    scientific.main(["--problem", "poisson2d_9873", "--optimizer", "hf", "--max-iters", "3", "--time-budget", "0",
                     "--out", str(tmp_path), "--no-progress"])
    (path,) = tmp_path.glob("*.json")
    solvers = [row.get("solver") for row in json.loads(path.read_text())["history"]]
    assert solvers[-1] == "residual"


def test_the_benchmark_table_sets_each_run_against_the_published_figures(tmp_path, capsys):
    from recipes import scientific

    scientific.main(["--problem", "poisson2d_257", "--optimizer", "hf", "--max-iters", "3", "--time-budget", "0",
                     "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "Dangel et al. (2024)" in out and "| poisson2d_257 (257) | hf |" in out and "ENGD 6.2e-08" in out


def test_a_problem_that_resamples_its_points_is_trained_on_fresh_points_and_seen_as_stochastic(tmp_path):
    """The heat benchmark draws new points every step (their HF run's batch_frequency 1): the
    recipe advances the problem before each update, and HF's measured regime is stochastic."""
    from recipes import pinns, scientific

    small = lambda: pinns.DangelHeat("mlp-tanh-64", n_interior=60, n_boundary=20)  # noqa: E731
    scientific.PROBLEMS["heat_small"] = small
    scientific.SCORE["heat_small"] = scientific.TITLES["heat_small"] = "L2 error (RMS)"
    try:
        result = scientific.run({"problem": "heat_small", "optimizer": "hf", "max_iters": 4, "time_budget": 0,
                                 "eval_every": None}, progress=False)
    finally:
        for table in (scientific.PROBLEMS, scientific.SCORE, scientific.TITLES):
            table.pop("heat_small")
    regimes = [row.get("regime") for row in result["history"][1:]]
    assert regimes[-1] == "stochastic", regimes


def test_the_engd_baseline_and_the_solver_option_run_and_say_what_they_solved(tmp_path):
    from recipes import scientific

    engd, = scientific.main(["--problem", "poisson2d_257", "--optimizer", "engd", "--max-iters", "3",
                             "--time-budget", "0", "--out", str(tmp_path), "--no-progress"])
    assert engd["history"][-1]["solver"] == "dense" and engd["history"][-1]["damping"] == 1e-10
    cg, = scientific.main(["--problem", "poisson2d_257", "--optimizer", "hf", "--solver", "cg", "--max-iters", "3",
                           "--time-budget", "0", "--out", str(tmp_path), "--no-progress"])
    assert cg["history"][-1]["solver"] == "cg" and cg["config"]["solver"] == "cg"
    assert (tmp_path / "scientific_poisson2d_257_hf_cg.json").exists()


@pytest.mark.parametrize("argv, expected", [
    ([], (1000, None, 1.0)),
    (["--device", "cuda"], (5000, 1250, 1.0)),
    (["--device", "cuda:1", "--optimizer", "adam"], (1000, None, 3e-3)),
    (["--device", "cuda", "--optimizer", "adam", "--batch-size", "200"], (200, None, 1e-3)),
    (["--device", "cuda", "--curvature-batch-size", "500"], (5000, 500, 1.0)),
    (["--optimizer", "adam"], (200, None, 1e-3)),
])
def test_autoencoder_batch_defaults_follow_the_device(argv, expected):
    """On CUDA the recipe's defaults are the larger batches measured better on an H200."""
    cfg = autoencoder._config(autoencoder.build_parser().parse_args(argv))
    assert (cfg["batch_size"], cfg["curvature_batch_size"], cfg["lr"]) == expected
