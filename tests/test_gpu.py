"""On a CUDA device: the model lives there, slices are taken there, the replay keeps its lesson.

Skipped where there is no CUDA (conftest.py); run on a GPU machine with `pytest -m cuda`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradwire
from gradwire._pb import trainer_pb2 as pb
from gradwire.replay import replay
from gradwire_server import staging, stats
from gradwire_server.app import start
from gradwire_server.optimizers import OptimizerSettings
from gradwire_server.trainer import Trainer
from tests.reference import run_tutorial
from tests.test_inspect import values_on_the_edges

pytestmark = pytest.mark.cuda


@pytest.fixture
def cuda_client() -> Iterator[gradwire.Client]:
    running = start(Trainer(device="cuda", seed=0), "127.0.0.1", 0)
    with gradwire.connect(f"127.0.0.1:{running.port}") as client:
        yield client
    running.stop(grace=None)


def test_model_lives_on_the_gpu(cuda_client: gradwire.Client) -> None:
    assert cuda_client.list_tensors().device.startswith("cuda")
    # GetServerInfo names the same device, and the CUDA build of PyTorch the server runs.
    info = cuda_client.server_info()
    assert info.device == cuda_client.list_tensors().device
    assert info.torch_version == torch.__version__


def test_replay_on_cuda_keeps_the_lesson(cuda_client: gradwire.Client) -> None:
    for init in ("fill", "random"):
        result = replay(cuda_client, init=init, seed=0, write=lambda line: None)  # type: ignore[arg-type]
        assert result.output_shape == (8, 20)
        assert result.grad_before_backward is None and result.grad_after_zero is None
        assert result.identity_holds
        # Near PyTorch's CPU run on the same inputs, not equal: cuDNN may sum in another
        # order, and in TF32. (The tolerance is the one run G7 passed against the CPU
        # values rounded; gradients of about 0.03.)
        local = run_tutorial(init, 0)
        np.testing.assert_allclose(result.grad_slice, local.grad_slice.numpy(), atol=2e-3)
        assert result.loss == pytest.approx(local.loss, rel=1e-2)


def test_a_read_prints_as_pytorch_prints_the_tensor_on_the_gpu(
    cuda_client: gradwire.Client,
) -> None:
    """`device='cuda:0'` and the node, as a print of the same tensor on the GPU shows them:
    the values are 0.1 exactly after the fill, so the prints match character for character."""
    from gradwire.display import format_read
    from tests.reference import Simple

    cuda_client.fill_parameters(0.1)
    model = Simple().to("cuda")
    for p in model.parameters():
        p.data.fill_(0.1)
    read = cuda_client.read("conv1.weight[0][0][0]")
    assert read.device == str(model.conv1.weight.device)
    assert format_read(read) == str(model.conv1.weight[0][0][0])
    assert format_read(cuda_client.read("conv1.weight[0, :1]")) == str(model.conv1.weight[0, :1])
    assert format_read(cuda_client.read("linear.weight")) == str(model.linear.weight)
    streamed = cuda_client._read_stream(pb.GetTensorRequest(name="conv2.weight"), as_torch=False)
    assert format_read(streamed) == str(model.conv2.weight)


def test_slice_is_taken_on_the_device(cuda_client: gradwire.Client) -> None:
    cuda_client.reset(0)
    read = cuda_client.read("linear.weight[3, ::-100]")
    torch.manual_seed(0)
    from gradwire_server.models import Simple

    local = Simple().linear.weight.detach().numpy()
    np.testing.assert_array_equal(read.value, local[3, ::-100])
    assert read.full_shape == (20, 3200)


def test_a_large_value_crosses_to_the_gpu_in_runs_intact() -> None:
    gen = torch.Generator().manual_seed(0)
    source = torch.randn(3 * staging.RUN_BYTES // 4 + 5, generator=gen)  # three runs and a bit
    out = staging.to_device(source, torch.device("cuda"))
    assert out.device.type == "cuda"
    assert torch.equal(out.cpu(), source)


#: Every CUDA device of the machine: cuda:1 and on find bugs that cuda:0 hides (a thread's
#: current device is 0 unless set).
DEVICES = [f"cuda:{i}" for i in range(torch.cuda.device_count())] or ["cuda:0"]


@pytest.mark.parametrize("device", DEVICES)
def test_pinned_runs_wait_for_a_busy_device_before_refilling(device: str) -> None:
    """The copies queue behind a kernel that keeps the device busy: a buffer refilled before
    the device had read it would corrupt the value (an event on the wrong device's stream
    waits for nothing)."""
    gen = torch.Generator().manual_seed(1)
    source = torch.randn(5 * staging.RUN_BYTES // 4 + 3, generator=gen)  # five runs and a bit
    with torch.cuda.device(device):
        torch.cuda._sleep(200_000_000)  # type: ignore[attr-defined]  # some 100 ms of cycles
    out = staging.to_device(source, torch.device(device))
    assert out.device == torch.device(device)
    assert torch.equal(out.cpu(), source)


def test_a_server_on_the_last_gpu_trains_and_reads_there() -> None:
    device = DEVICES[-1]
    running = start(Trainer(device=device, seed=0), "127.0.0.1", 0)
    try:
        with gradwire.connect(f"127.0.0.1:{running.port}") as client:
            assert client.list_tensors().device == device
            x = np.random.default_rng(2).standard_normal((4096, 3, 10, 10)).astype(np.float32)
            client.forward(x, np.zeros(4096, dtype=np.int64))  # 4.9 MB: pinned runs
            np.testing.assert_array_equal(client.get("input"), x)
            client.backward()
            client.step()
            assert client.get("linear.weight.grad") is not None
    finally:
        running.stop(grace=None)


def test_a_device_the_machine_lacks_is_refused_with_the_count() -> None:
    from gradwire_server.devices import resolve_device
    from gradwire_server.errors import InvalidInput

    with pytest.raises(InvalidInput, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_nesterov_steps_leave_the_gradients_as_backward_made_them() -> None:
    settings = OptimizerSettings(kind="sgd", lr=0.1, momentum=0.9, nesterov=True)
    gpu = Trainer(device="cuda", seed=0, optimizer=settings)
    x, y = torch.randn(8, 3, 10, 10), torch.randint(0, 20, (8,))
    for _ in range(2):  # the second Step has a momentum buffer to add
        gpu.train_step(x, y, zero_grad=True, use=lambda s: s)
        before = gpu.parameters["linear.weight"].grad.clone()  # type: ignore[union-attr]
        gpu.step()
        # torch's foreach SGD, CUDA's default, would have added the momentum buffer.
        assert torch.equal(gpu.parameters["linear.weight"].grad, before)
    gpu.close()


def test_a_large_forward_input_gives_the_cpu_s_loss(cuda_client: gradwire.Client) -> None:
    # 10,240 samples: 12.3 MB of input, three pinned runs and a bit, so both buffers are
    # refilled.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10240, 3, 10, 10)).astype(np.float32)
    y = rng.integers(0, 20, size=10240)
    result = cuda_client.forward(x, y)
    torch.manual_seed(0)
    from gradwire_server.models import Simple

    expected = nn.CrossEntropyLoss()(Simple()(torch.from_numpy(x)), torch.from_numpy(y))
    assert result.output_shape == (10240, 20)
    # cuDNN's convolutions may use TF32 on the GPU: close, not equal.
    assert result.loss == pytest.approx(expected.item(), rel=2e-3)
    np.testing.assert_array_equal(cuda_client.get("input"), x)


def test_a_checkpoint_loads_onto_the_gpu_bit_for_bit(tmp_path: Path) -> None:
    cpu = Trainer(seed=3, optimizer=OptimizerSettings(kind="adam", lr=1e-3))
    x, y = torch.randn(8, 3, 10, 10), torch.randint(0, 20, (8,))
    cpu.train_step(x, y, use=lambda s: s)
    cpu.save(tmp_path / "state.safetensors")
    gpu = Trainer(device="cuda", seed=0)
    gpu.load(tmp_path / "state.safetensors")
    for name, p in cpu.parameters.items():
        assert torch.equal(gpu.parameters[name].detach().cpu(), p.detach()), name
        assert torch.equal(gpu.parameters[name].grad.cpu(), p.grad), name  # type: ignore[union-attr]
    cpu.close()
    gpu.close()


def test_a_run_s_sent_batch_crosses_to_the_gpu_once_and_trains_as_on_the_cpu(
    cuda_client: gradwire.Client,
) -> None:
    trainer = Trainer(device="cuda", seed=0)
    x = torch.randn(8, 3, 10, 10)
    staged = trainer.stage(x, "input")
    assert isinstance(staged, torch.Tensor) and staged.device.type == "cuda"
    assert torch.equal(staged.cpu(), x)
    trainer.close()
    rng = np.random.default_rng(1)
    batch = rng.standard_normal((8, 3, 10, 10)).astype(np.float32), rng.integers(0, 20, size=8)
    cuda_client.set_optimizer("sgd", lr=0.05)
    on_gpu = list(cuda_client.train(*batch, steps=4, every=4))[-1]
    cpu = Trainer(seed=0, optimizer=OptimizerSettings(kind="sgd", lr=0.05))
    for _ in range(4):
        expected = cpu.train_step(
            torch.from_numpy(batch[0]), torch.from_numpy(batch[1]), zero_grad=True, use=lambda s: s
        )
    cpu.close()
    assert on_gpu.loss == pytest.approx(expected.loss, rel=2e-3)  # TF32 convolutions: close


def test_a_gpu_trainer_keeps_a_thread_of_its_own() -> None:
    # Shared only on the CPU (torch_thread.py): one session's wait for its device does not
    # hold up another's calls.
    a, b, cpu = Trainer(device="cuda", seed=0), Trainer(device="cuda", seed=0), Trainer(seed=0)
    assert not a._torch.shared and a._torch.ident != b._torch.ident != cpu._torch.ident
    for trainer in (a, b, cpu):
        trainer.close()


def test_a_small_gpu_read_runs_on_the_caller_s_thread_after_the_queued_step() -> None:
    # Trainer.read_with: no hand-off to the torch thread for a small tensor's copy to the
    # host. The copy goes on the device's default stream, behind the Backward and Step still
    # queued there (behind a kernel that spins for about half a second first).
    import threading

    from gradwire_server.fills import FillSpec
    from gradwire_server.results import Selection

    trainer = Trainer(device="cuda", seed=0)
    trainer.forward(FillSpec("ones", (4096, 3, 10, 10)), FillSpec("ones", (4096,)))
    before = trainer.read("conv1.weight").value
    trainer._run(torch.cuda._sleep, 1_000_000_000)
    trainer.backward()
    trainer.step()  # returns with its kernels queued: nothing left the device

    def on(selection: Selection) -> tuple[threading.Thread, torch.Tensor]:
        assert selection.part is not None
        return threading.current_thread(), selection.host()

    thread, after = trainer.read_with("conv1.weight", (), on, copies_only=True)
    torch.cuda.synchronize()
    settled = trainer.read("conv1.weight").value
    # Other work on a GPU tensor (statistics: cuBLAS keeps a handle per thread) stays on
    # the torch thread.
    other, _ = trainer.read_with("conv1.weight", (), on)
    trainer.close()
    assert thread is threading.current_thread()
    assert other is not threading.current_thread()
    assert before is not None and settled is not None
    assert not torch.equal(after, before)
    assert torch.equal(after, settled)


def test_a_streamed_read_of_a_gpu_tensor_is_copied_on_the_device_and_comes_out_whole() -> None:
    # live.py: on a GPU the read copies its selection on the device when it opens, and each
    # run crosses to the host through one pinned buffer.
    from gradwire_server.convert import SpareMemory

    trainer = Trainer(device="cuda", seed=0)
    expected = trainer.read("linear.weight").value
    assert expected is not None
    _, read = trainer.stream_read("linear.weight", (), SpareMemory())
    assert read is not None and read.copied
    trainer.fill_parameters(7.0)
    runs = []
    for offset in range(0, read.numel, 10_000):
        with read.run(offset, min(10_000, read.numel - offset)) as host:
            assert host.device.type == "cpu" and host.is_pinned()
            runs.append(host.clone())
    read.close()
    trainer.close()
    assert torch.equal(torch.cat(runs), expected.reshape(-1))


def test_statistics_and_a_watch_are_computed_on_the_gpu_as_on_the_cpu(
    cuda_client: gradwire.Client,
) -> None:
    cuda_client.reset(0)
    torch.manual_seed(0)
    from gradwire_server.models import Simple

    local = Simple().linear.weight.detach().double()
    summary = cuda_client.stats("linear.weight", bins=10).stats
    assert summary is not None and summary.count == local.numel()
    assert summary.min == pytest.approx(local.min().item())
    assert summary.max == pytest.approx(local.max().item())
    assert summary.mean == pytest.approx(local.mean().item(), abs=1e-6)
    assert summary.histogram is not None and sum(summary.histogram.counts) == local.numel()
    watch = cuda_client.watch(["linear.weight[0, :5]"], values=True, bins=4)
    first = next(watch)
    watch.close()
    np.testing.assert_array_equal(first.tensors[0].value, local[0, :5].float().numpy())


@pytest.mark.parametrize("seed", range(10))
def test_a_histogram_on_the_gpu_counts_values_on_its_edges_as_numpy_does(seed: int) -> None:
    values, bins, low, high = values_on_the_edges(seed)
    on_gpu = torch.from_numpy(values).to("cuda")
    summary = stats.summarize(on_gpu, bins=bins, low=low, high=high)
    assert summary.histogram is not None
    counts, _ = np.histogram(values[np.isfinite(values)], bins, (low, high))
    assert summary.histogram.counts == counts.tolist()
    # And with the range the values give, their finite extremes.
    summary = stats.summarize(on_gpu, bins=bins)
    finite = values[np.isfinite(values)]
    counts, _ = np.histogram(finite, bins, (finite.min(), finite.max()))
    assert summary.histogram is not None and summary.histogram.counts == counts.tolist()


def test_a_train_step_s_fetches_are_what_a_read_after_it_gives(
    cuda_client: gradwire.Client,
) -> None:
    cuda_client.reset(0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 3, 10, 10)).astype(np.float32)
    y = rng.integers(0, 20, size=8)
    fetch = ["loss", "conv1.weight.grad[0]", "linear.weight[::7, -3:]"]
    result = cuda_client.train_step(x, y, zero_grad=True, fetch=fetch)
    for name, read in zip(fetch, result.fetched, strict=True):
        np.testing.assert_array_equal(read.value, cuda_client.get(name))


def test_a_streamed_write_to_the_gpu_reads_back_bit_for_bit(
    cuda_client: gradwire.Client,
) -> None:
    value = np.random.default_rng(4).standard_normal((20, 3200)).astype(np.float32)
    cuda_client.stream_above_bytes = 0  # SetTensorStream, in chunks
    cuda_client.chunk_bytes = 64 * 1024
    cuda_client.set("linear.weight", value)
    np.testing.assert_array_equal(cuda_client.get("linear.weight"), value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_streamed_chunks_are_assembled_on_the_gpu_as_they_come(dtype: torch.dtype) -> None:
    # convert._OnDevice: a GPU trainer's streamed value crosses chunk by chunk through pinned
    # runs (here many: 4 KiB runs, 64 KiB chunks), the host never holding it whole. A kernel
    # spinning for about half a second first keeps the copies queued: a buffer refilled
    # before its copy ran would show as wrong values.
    from gradwire_server import convert
    from tests.test_staging import SET_CHUNK, chunk_splits

    drawn = torch.randn(1100, 1001, generator=torch.Generator().manual_seed(6)) * 100
    value = drawn > 0 if dtype == torch.bool else drawn.to(dtype)  # each 1 MiB or more
    trainer = Trainer(device="cuda", seed=0)
    chunks = convert.Chunks("value", 10**7, convert.SpareMemory(), trainer)
    assembly = chunks._assembler
    assert isinstance(assembly, convert._OnDevice)
    assembly.run_bytes = 4096
    torch.cuda._sleep(1_000_000_000)
    for split in chunk_splits(value, 64 * 1024):
        chunks.add(split, SET_CHUNK, split.message.chunk)
    assert assembly._runs is not None and assembly._runs._pinned
    out = chunks.tensor()
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == value.shape
    assert torch.equal(out.cpu().view(-1).view(torch.uint8), value.view(-1).view(torch.uint8))
    chunks.release()
    trainer.close()


def test_a_streamed_whole_parameter_on_the_gpu_becomes_the_parameter() -> None:
    # Assembled on the device, the value is adopted as it is: no second device copy.
    running = start(Trainer(device="cuda", seed=0), "127.0.0.1", 0)
    param = running.trainer.parameters["linear.weight"]
    before = param.data_ptr()
    value = np.random.default_rng(8).standard_normal((20, 3200)).astype(np.float32)
    with gradwire.connect(f"127.0.0.1:{running.port}") as client:
        client.stream_above_bytes = 0
        client.set("linear.weight", value)
        np.testing.assert_array_equal(client.get("linear.weight"), value)
    after = running.trainer.parameters["linear.weight"].data_ptr()
    assert running.trainer.device_assemblies.acquire(blocking=False)  # given back
    running.stop(grace=None)
    assert after != before


def test_a_streamed_forward_input_on_the_gpu_gives_the_unstreamed_loss(
    cuda_client: gradwire.Client,
) -> None:
    x = np.random.default_rng(7).standard_normal((64, 3, 10, 10)).astype(np.float32)
    y = np.arange(64) % 20
    cuda_client.reset(0)
    whole = cuda_client.forward(x, y)
    cuda_client.reset(0)
    cuda_client.stream_above_bytes = 0  # ForwardStream, in chunks
    cuda_client.chunk_bytes = 16 * 1024
    streamed = cuda_client.forward(x, y)
    assert streamed.loss == whole.loss


def test_a_closed_gpu_session_gives_its_memory_back_at_once(
    cuda_client: gradwire.Client,
) -> None:
    session = cuda_client.open_session(seed=0)
    session.set_optimizer("adam", lr=0.01)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 3, 10, 10)).astype(np.float32)
    session.train_step(x, np.zeros(64, dtype=np.int64))
    # Its parameters, gradients and Adam's two moments at least (the server is in this
    # process). Not "back to where it was": cuBLAS keeps a workspace per thread.
    parameters = [t for t in session.list_tensors().tensors if t.kind == "parameter"]
    kept = 4 * sum(4 * int(np.prod(t.shape)) for t in parameters)
    torch.cuda.synchronize()
    during = torch.cuda.memory_allocated()
    session.close()
    torch.cuda.synchronize()
    assert during - torch.cuda.memory_allocated() >= kept


def test_an_id_past_an_embedding_s_table_fails_the_call_that_sent_it(tmp_path: Path) -> None:
    """A device-side assert is raised at the next synchronisation: a Forward without a loss
    answered OK, and another caller's next call failed; then the server stopped (found by the
    twenty-first session's review of the contract). Its own server process: the assert
    leaves the process's CUDA context unusable."""
    from tests.serve_process import serving

    port_file = tmp_path / "port"
    args = ("--model", "tests.broken_models:TOKENS", "--device", "cuda", "--grace", "1")
    with serving(*args, "--port-file", str(port_file)) as (process, _):
        address = f"127.0.0.1:{port_file.read_text().strip()}"
        with gradwire.connect(address, timeout=60) as client:
            assert client.forward(np.array([[1, 2, 3, 9]])).version == 1
            with pytest.raises(gradwire.errors.RemoteError):
                client.forward(np.array([[1, 2, 3, 10]]))  # no target: no loss to read back
        assert process.wait(timeout=60) == 1
