"""The autotuning timer must see the caller's inputs as the caller's stream leaves them."""
import pytest
import torch

from tcaq_kernels.triton.numerics import tuning_bench


@pytest.mark.cuda
def test_configs_are_timed_on_inputs_the_callers_stream_has_written():
    """`do_bench_cudagraph` times on a stream of its own: without the drain in `tuning_bench`, its
    first call of `fn` overtakes a write still queued behind ~30 ms of work on the caller's stream and
    reads the old values (on an H100 the conv's autotuning faulted, but only after other tests)."""
    src = torch.full((1 << 20,), -1.0, device="cuda")
    dst = torch.empty_like(src)
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # GPU cycles on the caller's stream (tens of ms)
    src.fill_(2.0)  # queued behind the sleep, as a producer kernel or a host copy would be
    first = []

    def fn():
        if not first:  # the warm-up call, before the timer's own sync
            first.append(src.clone())
        dst.copy_(src)

    tuning_bench(fn, quantiles=(0.5, 0.2, 0.8))
    assert torch.equal(first[0], torch.full_like(src, 2.0)), "a config was timed on stale inputs"
