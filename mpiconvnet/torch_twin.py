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


def torch_sgd(torch, named_parameters, lr, momentum=0.9, weight_decay=5e-4, bias_lr_mult=2.0):
    """PyTorch's SGD doing our optimizer's update (optim.SGD: biases at bias_lr_mult x lr
    and without weight decay; with a constant lr, PyTorch's lr-outside-the-momentum form
    is the same maths) in its fastest mode: `fused`, one pass over each tensor, where this
    torch has it. The default (per-tensor loop on CPU, multi-tensor on CUDA) makes ~4
    passes and a temporary the size of all gradients: 5x slower for AlexNet on 2 CPU cores,
    which flattered our ratio."""
    named = list(named_parameters)
    groups = [{"params": [p for n, p in named if not n.endswith(".bias")], "lr": lr, "weight_decay": weight_decay},
              {"params": [p for n, p in named if n.endswith(".bias")], "lr": lr * bias_lr_mult, "weight_decay": 0.0}]
    try:
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, fused=True)
    except (RuntimeError, TypeError, ValueError):   # a torch or device without the fused kernel
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
