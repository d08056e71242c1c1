"""Two-part inputs for the launchers' `x2` (a channel concatenation read in place) and their materialised reference."""
import torch

# How a [B, S, C] part lies in memory: "nchw" the permuted view of an NCHW tensor (pixels fastest), "nhwc"
# channels last (contiguous), "slice" a channel slice of a wider channels-last tensor (its own pixel stride).
LAYOUTS = ("nchw", "nhwc", "slice")


def part(gen, B, S, C, layout, dtype=torch.float32, device="cpu", offset=0.0):
    """A random [B, S, C] part laid out as `layout` (non-zero values, a per-channel offset)."""
    shift = torch.randn(C, generator=gen) * offset
    if layout == "nchw":
        x = (torch.randn(B, C, S, generator=gen) * 2 + shift[:, None]).to(dtype).to(device).transpose(1, 2)
    elif layout == "nhwc":
        x = (torch.randn(B, S, C, generator=gen) * 2 + shift).to(dtype).to(device)
    else:  # sliced after the conversions, which would make it contiguous
        wide = torch.randn(B, S, C + 5, generator=gen) * 2
        wide[..., 3:3 + C] += shift
        x = wide.to(dtype).to(device)[..., 3:3 + C]
    assert x.shape == (B, S, C) and (layout == "nhwc") == x.is_contiguous()
    return x


def cat_like(x3, x2):
    """`torch.cat([x3, x2], -1)` laid out as the model's `torch.cat(dim=1)` of the two parts would be: channels
    fastest (contiguous) where both parts are, else by channel planes (a permuted NCHW tensor)."""
    if x3.stride(2) == 1 and x2.stride(2) == 1:
        return torch.cat([x3, x2], dim=-1)
    return torch.cat([x3.transpose(1, 2), x2.transpose(1, 2)], dim=1).transpose(1, 2)
