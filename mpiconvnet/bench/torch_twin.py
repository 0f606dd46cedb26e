"""The same network in PyTorch, with our parameter names: the baseline of `bench step`
and the convention check of tests/test_models.py. torch is not a dependency; callers
import it and pass it in."""


def torch_twin(net, torch):
    """An nn.Module computing what `net` computes, loaded with net's current weights."""
    nn, F = torch.nn, torch.nn.functional
    layers = net.layers

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            for layer in layers:
                if layer.params and len(layer.weight_shape) == 4:
                    out_ch, in_per_group, k, _ = layer.weight_shape
                    setattr(self, layer.name, nn.Conv2d(in_per_group * layer.groups, out_ch, k, layer.stride,
                                                        layer.pad, groups=layer.groups))
                elif layer.params:
                    setattr(self, layer.name, nn.Linear(layer.weight_shape[1], layer.weight_shape[0]))

        def forward(self, x):
            for layer in layers:
                kind = type(layer).__name__
                if layer.params:
                    x = getattr(self, layer.name)(x)
                elif kind == "ReLU":
                    x = F.relu(x, inplace=True)
                elif kind == "LRN":
                    x = F.local_response_norm(x, layer.size, layer.alpha, layer.beta, layer.k)
                elif kind == "MaxPool":
                    x = F.max_pool2d(x, layer.size, layer.stride)
                elif kind == "Dropout":
                    x = F.dropout(x, layer.p, self.training)
                elif kind == "Flatten":
                    x = torch.flatten(x, 1)
            return x

    twin = Twin()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in net.state_dict().items()})
    return twin
