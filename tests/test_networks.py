import random

import pytest
import torch
from torch import nn

from supernet import (
    DARTS_GENOTYPES,
    EvalNetwork,
    SearchNetwork,
    count_parameters,
    get_space,
    preserved_batchnorm,
    recalibrate_batchnorm,
)

ALL_3X3 = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|"
ALL_NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"


# --- parameters -------------------------------------------------------------------------------------
@pytest.mark.parametrize("space, mixing", [("darts", "softmax"), ("darts", "partial"), ("nb201", "gumbel"),
                                           ("nb201", "sample")])
def test_arch_and_weight_parameters_are_disjoint_and_cover_everything(space, mixing):
    net = SearchNetwork(space, 4, 3 if space == "darts" else 1, 5, mixing=mixing)
    arch = {id(p) for p in net.arch_parameters()}
    weights = {id(p) for p in net.weight_parameters()}
    assert arch and weights and not arch & weights
    assert arch | weights == {id(p) for p in net.parameters()}
    state = net.state_dict()
    for ct in net.space.cell_types:
        assert torch.equal(state[f"alphas_{ct}"], net.alphas(ct))
    assert ("betas_normal" in state) == (mixing == "partial" and space == "darts")


def test_state_dict_round_trip_restores_the_architecture():
    a, b = SearchNetwork("darts", 4, 3, 5), SearchNetwork("darts", 4, 3, 5)
    with torch.no_grad():
        a.alphas_normal.normal_()
        a.alphas_reduce.normal_()
    b.load_state_dict(a.state_dict())
    assert b.derive() == a.derive()


# --- evaluation networks: parameter counts equal the reference implementations' ----------------------
def test_darts_v2_cifar_network_has_the_papers_3_3m_parameters():
    net = EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], C=36, layers=20, num_classes=10, auxiliary=True)
    assert count_parameters(net) == 3_349_342  # DARTS's train.py log: "param size = 3.349342MB"


def test_darts_v2_imagenet_network_has_the_papers_4_7m_parameters():
    net = EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], C=48, layers=14, num_classes=1000, auxiliary=True,
                      stem="imagenet")
    assert count_parameters(net) == 4_718_752  # DARTS's train_imagenet.py log: "param size = 4.718752MB"


@pytest.mark.parametrize("arch, params", [(ALL_3X3, 1_531_546), (ALL_NONE, 73_306)])
def test_nb201_tiny_network_matches_the_benchmarks_parameter_range(arch, params):
    # NAS-Bench-201 on CIFAR-10 ranges from 0.073306 MB (all none) to 1.531546 MB (all 3x3 convs).
    assert count_parameters(EvalNetwork("nb201", arch, C=16, layers=5, num_classes=10)) == params


def test_darts_evaluation_network_runs_every_named_genotype_with_aux_head_in_training():
    for name, genotype in DARTS_GENOTYPES.items():
        net = EvalNetwork("darts", genotype, C=4, layers=3, num_classes=7, auxiliary=True, drop_path=0.2)
        net.train()
        logits, aux = net(torch.randn(2, 3, 32, 32))
        assert logits.shape == aux.shape == (2, 7), name
        net.eval()
        assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_drop_path_is_random_in_training_and_off_in_eval():
    torch.manual_seed(0)
    net = EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], C=4, layers=3, num_classes=3, drop_path=0.5)
    x = torch.randn(4, 3, 16, 16)
    net.train()
    a, b = net(x), net(x)
    assert not torch.allclose(a, b)  # dropped paths differ between passes
    net.eval()
    torch.testing.assert_close(net(x), net(x))


# --- subnetworks --------------------------------------------------------------------------------------
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_subnet_runs_only_the_chosen_paths_with_shared_weights(space):
    torch.manual_seed(0)
    net = SearchNetwork(space, 4, 3 if space == "darts" else 1, 5, in_channels=1)
    genotype = net.space.random_genotype(random.Random(2))
    sub = net.subnet(genotype)
    ran = set()
    for c, cell in enumerate(net.cells):
        for e, edge in enumerate(getattr(cell, "edges", [])):
            for name, op in edge.ops.items():
                op.register_forward_hook(lambda m, i, o, key=(c, e, name): ran.add(key))
    x = torch.randn(2, 1, 8, 8)
    sub.eval()
    before = sub(x)
    paths = net.space.to_paths(genotype)
    assert ran == {(c, e, net.space.ops[k]) for c, cell in enumerate(net.cells) if hasattr(cell, "edges")
                   for e, k in enumerate(paths[cell.cell_type]) if k is not None and net.space.ops[k] != "none"}
    with torch.no_grad():
        net.classifier.bias.add_(1.0)  # a change to the supernet is seen by the subnet
    torch.testing.assert_close(sub(x), before + 1.0)


def test_batchnorm_recalibration_estimates_statistics_and_can_be_undone():
    torch.manual_seed(0)
    net = SearchNetwork("nb201", 4, 1, 5, in_channels=1)
    sub = net.subnet(get_space("nb201").parse(ALL_3X3))
    batches = [torch.randn(8, 1, 8, 8) * 3 + 2 for _ in range(3)]
    stem_bn = net.stem[1]
    original = stem_bn.running_mean.clone()
    with preserved_batchnorm(net):
        recalibrate_batchnorm(sub, [(b, None) for b in batches], num_batches=2)
        with torch.no_grad():
            stem_out = torch.cat([net.stem[0](b) for b in batches[:2]])
        torch.testing.assert_close(stem_bn.running_mean, stem_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
        assert not sub.training
    assert torch.equal(stem_bn.running_mean, original)


# --- bad input ----------------------------------------------------------------------------------------
def test_wrong_input_shapes_are_named():
    net = SearchNetwork("darts", 4, 3, 5, in_channels=1)
    with pytest.raises(ValueError, match=r"input has shape \(2, 3, 8, 8\); expected \(batch, 1, height, width\)"):
        net(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"input has shape \(8, 8\)"):
        net(torch.randn(8, 8))
    with pytest.raises(ValueError, match="dtype torch.int64"):
        net(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    evalnet = EvalNetwork("nb201", ALL_3X3, 4, 1, 5)
    with pytest.raises(ValueError, match=r"expected \(batch, 3, height, width\)"):
        evalnet(torch.randn(2, 1, 8, 8))


def test_bad_constructor_arguments_are_named():
    with pytest.raises(ValueError, match="unknown search space 'darts2'"):
        SearchNetwork("darts2", 4, 3, 5)
    with pytest.raises(ValueError, match="C must be a positive integer, got 0"):
        SearchNetwork("darts", 0, 3, 5)
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], 4, -1, 5)
    with pytest.raises(ValueError, match="does not fit the darts space"):
        SearchNetwork("darts", 4, 3, 5).subnet(DARTS_GENOTYPES["NASNet"])
    with pytest.raises(ValueError, match="unknown op 'conv_9x9'"):
        EvalNetwork("nb201", ALL_3X3.replace("nor_conv_3x3~2", "conv_9x9~2"), 4, 1, 5)
    with pytest.raises(ValueError, match="malformed genotype"):
        EvalNetwork("darts", "Genotype(normal=", 4, 3, 5)
    with pytest.raises(ValueError, match="no auxiliary head"):
        EvalNetwork("nb201", ALL_3X3, 4, 1, 5, auxiliary=True)
    with pytest.raises(ValueError, match="set_active needs mixing='sample'"):
        SearchNetwork("nb201", 4, 1, 5).set_active(None)
    with pytest.raises(ValueError, match="stem_multiplier must be a positive integer, got 0"):
        SearchNetwork("darts", 4, 3, 5, stem_multiplier=0)
    with pytest.raises(ValueError, match="drop_path must be a non-negative finite number below 1.0, got nan"):
        EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], 4, 3, 5, drop_path=float("nan"))


@pytest.mark.parametrize("genotype, message", [
    ((1, 2, 3, 4), "normal=1 is not a list of"),
    ("Genotype(normal=1, ...)", "malformed genotype"),
    (DARTS_GENOTYPES["DARTS_V2"]._replace(reduce_concat=[0, 2]), "reduce_concat names node 0"),
    (DARTS_GENOTYPES["DARTS_V2"]._replace(normal_concat=[2, 9]), "normal_concat names node 9"),
])
def test_bad_evaluation_genotypes_are_refused_at_construction(genotype, message):
    with pytest.raises(ValueError, match=message):
        EvalNetwork("darts", genotype, 4, 3, 5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_of_another_dtype_than_the_parameters_is_named(dtype):
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    search = SearchNetwork("darts", 4, 2, 5)
    networks = [search, search.subnet(DARTS_GENOTYPES["DARTS_V2"]),
                EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], 4, 2, 5), EvalNetwork("nb201", ALL_3X3, 4, 1, 5)]
    for net in networks:
        with pytest.raises(ValueError, match=f"dtype {dtype}; expected torch.float32"):
            net(x)


def test_networks_converted_to_float64_take_float64_input():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    search = SearchNetwork("nb201", 4, 1, 5).double()
    for net in (search, search.subnet(ALL_3X3), EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], 4, 2, 5).double()):
        assert net(x).dtype == torch.float64
    with pytest.raises(ValueError, match="dtype torch.float32; expected torch.float64"):
        search(x.float())


@pytest.mark.parametrize("space, layers, expected", [
    ("darts", 5, [("cell", 4, False), ("cell", 8, True), ("cell", 8, False), ("cell", 16, True), ("cell", 16, False)]),
    ("nb201", 1, [("cell", 4, False), ("residual", 8, True), ("cell", 8, False), ("residual", 16, True),
                  ("cell", 16, False)]),
])
def test_spaces_declare_the_skeleton_the_networks_build(space, layers, expected):
    blocks = get_space(space).blocks(4, layers)
    assert [(b.kind, b.channels, b.reduction) for b in blocks] == expected
    net = SearchNetwork(space, 4, layers, 5)
    kinds = ["cell" if hasattr(cell, "edges") else "residual" for cell in net.cells]
    assert kinds == [b.kind for b in blocks]


def test_evaluation_network_trains_on_a_derived_genotype():
    torch.manual_seed(0)
    search = SearchNetwork("darts", 4, 3, 3, in_channels=1)
    net = EvalNetwork("darts", search.derive(), 4, 3, 3, in_channels=1)
    x, y = torch.randn(16, 1, 8, 8), torch.arange(16) % 3
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("size", [7, 9])
def test_networks_accept_odd_input_sizes(size):
    x = torch.randn(2, 1, size, size)
    assert SearchNetwork("nb201", 4, 1, 3, in_channels=1)(x).shape == (2, 3)
    assert SearchNetwork("darts", 4, 3, 3, in_channels=1, mixing="partial", partial_k=2)(x).shape == (2, 3)
    assert EvalNetwork("nb201", ALL_3X3, 4, 1, 3, in_channels=1)(x).shape == (2, 3)
    assert EvalNetwork("darts", DARTS_GENOTYPES["DARTS_V2"], 4, 3, 3, in_channels=1)(x).shape == (2, 3)
