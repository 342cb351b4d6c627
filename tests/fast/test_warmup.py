"""sd_backend.fast.graphs.once_per_signature: the warm-up before a capture runs the UNet
once per call signature and leaves the model as it found it."""

import torch

from sd_backend.fast.graphs import once_per_signature


class Counting(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, sample, timestep, encoder_hidden_states=None, return_dict=True):
        self.calls += 1
        return (sample * self.scale + timestep,)


def test_each_signature_runs_once_and_later_calls_get_its_output():
    model = Counting()
    sample, embeds = torch.ones(2, 4, 8, 8), torch.zeros(2, 3, 5)
    with once_per_signature(model):
        first = model(sample, torch.tensor(1.0), encoder_hidden_states=embeds, return_dict=False)
        again = model(sample + 1, torch.tensor(7.0), encoder_hidden_states=embeds, return_dict=False)
        assert again is first and model.calls == 1  # same shapes: the first call's output
        half = model(sample[:1], torch.tensor(1.0), encoder_hidden_states=embeds[:1], return_dict=False)
        assert model.calls == 2 and half[0].shape[0] == 1  # a guidance cutoff's half batch runs
        model(sample.to(memory_format=torch.channels_last), torch.tensor(1.0), encoder_hidden_states=embeds, return_dict=False)
        assert model.calls == 3  # other strides: other cuDNN algorithms, so it runs too
        model(sample, torch.tensor(1.0), encoder_hidden_states=embeds, return_dict=True)
        assert model.calls == 4  # a flag's value is part of the signature


def test_the_model_runs_every_call_again_afterwards():
    model = Counting()
    sample = torch.ones(1, 4, 8, 8)
    with once_per_signature(model):
        model(sample, 1.0)
        model(sample, 2.0)
    assert "forward" not in model.__dict__
    out = model(sample, 3.0)
    assert model.calls == 2 and torch.equal(out[0], sample * 2 + 3)


def test_a_forward_the_instance_holds_itself_is_put_back():
    """torch.compile's OptimizedModule keeps its compiled forward in the instance."""
    model = Counting()
    own = model.forward
    model.forward = own
    with once_per_signature(model):
        model(torch.ones(1), 1.0)
        model(torch.ones(1), 1.0)
    assert model.__dict__["forward"] is own and model.calls == 1
