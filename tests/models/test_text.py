"""The text path's models: the word tokenizer (round trip, limits, bad captions) and the MMDiT
(shapes, AdaLN-Zero at init, the joint attention's mask over padded prompts)."""

import pytest
import torch

from models.conventions import null_like
from models.mmdit import MMDiT, mmdit_config
from models.registry import build_model, model_spec
from models.text import PAD, UNK, WordTokenizer, caption_text, words

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [
    "a small red triangle on blue stripes",
    "a large green circle on a dark gradient",
    "A small red circle, on blue stripes!",
]


def test_the_tokenizer_round_trips_and_its_ids_do_not_depend_on_caption_order():
    tok = WordTokenizer.build(CAPTIONS, max_length=8)
    assert tok.vocab[:2] == ("<pad>", "<unk>") and tok.vocab[2:4] == ("a", "on")  # most frequent first
    assert WordTokenizer.build(reversed(CAPTIONS), max_length=8) == tok
    for caption in CAPTIONS:
        ids, cut = tok.encode(caption)
        assert cut == 0 and UNK not in ids
        assert tok.decode(ids) == " ".join(words(caption))  # normalised: lower case, punctuation dropped
    assert tok.decode(tok.encode("a purple triangle")[0]) == "a <unk> triangle"
    assert WordTokenizer.from_json(tok.to_json()) == tok


def test_limits_long_and_empty_captions():
    tok = WordTokenizer.build(CAPTIONS, max_length=4)
    ids, cut = tok.encode("a small red triangle on blue stripes")
    assert len(ids) == 4 and cut == 3
    batch = tok.batch(["a small red triangle on blue stripes", "", "circle"])
    assert batch.shape == (3, 4) and batch.dtype == torch.long
    assert batch[1].tolist() == [PAD] * 4  # the empty prompt: all padding
    assert batch[2].tolist()[1:] == [PAD] * 3
    with pytest.raises(ValueError, match="starts with"):
        WordTokenizer(("a", "b"))


@pytest.mark.parametrize(
    "raw, text, problem",
    [
        ("a red  circle\non stripes", "a red circle on stripes", None),
        (b"a red circle", "a red circle", None),
        (b"a \xff\xfe red circle", "a \ufffd\ufffd red circle", "not UTF-8"),
        ("", "", "empty"),
        ("  !? ", "!?", "empty"),
        (None, "", "missing"),
        ("word " * 300, ("word " * 200)[:1000], "longer than 1000 characters"),
    ],
)
def test_bad_captions_are_made_safe_and_named(raw, text, problem):
    got, found = caption_text(raw)
    assert got == text.strip() if problem != "longer than 1000 characters" else got == text
    assert found == problem


def tiny_mmdit(vocab=20, seed=0, off_zero=False, **overrides):
    torch.manual_seed(seed)
    net = MMDiT(
        mmdit_config("MMDiT-T/2", input_size=8, in_channels=2, vocab_size=vocab, max_text_length=6, **overrides)
    )
    if off_zero:  # as if trained: every layer away from AdaLN-Zero's zeros
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net.double()


def inputs(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    y = torch.tensor([[2, 3, 4, 0, 0, 0], [5, 6, 7, 8, 9, 10], [0] * 6])[:n]  # padded, full, empty
    return x, t, y


def test_a_fresh_mmdit_outputs_zero_and_each_block_is_the_identity_on_both_streams():
    net = tiny_mmdit()
    x, t, y = inputs()
    v = net(x, t, y)
    assert v.shape == x.shape and torch.equal(v, torch.zeros_like(v))
    text, _, keep = net.text_encoder(y)
    image = torch.randn(3, 16, 64, dtype=torch.float64)
    c = torch.randn(3, 64, dtype=torch.float64)
    for block in net.blocks:
        text_out, image_out = block(text, image, c, keep)
        assert torch.equal(text_out, text) and torch.equal(image_out, image)


def test_padding_is_never_attended_to_and_rows_do_not_see_each_other():
    net = tiny_mmdit(off_zero=True)
    x, t, y = inputs()
    v = net(x, t, y)
    assert torch.isfinite(v).all()  # the empty prompt (all padding) included
    with torch.no_grad():  # what padding embeds to cannot matter where a prompt has words
        net.text_encoder.embedding.weight[PAD].add_(torch.randn(64, dtype=torch.float64))
    moved = net(x, t, y)
    assert torch.allclose(moved[:2], v[:2], atol=1e-12)
    # a padded prompt alone, or batched beside a longer one, gets the same velocity
    assert torch.allclose(net(x[:1], t[:1], y[:1]), moved[:1], atol=1e-12)
    # and a prompt cut to its words (no padding columns at all) too
    assert torch.allclose(net(x[:1], t[:1], y[:1, :3]), moved[:1], atol=1e-10)


def test_the_caption_is_used_and_the_null_prompt_is_all_padding():
    net = tiny_mmdit(off_zero=True)
    x, t, y = inputs()
    other = y.clone()
    other[0, 0] = 11
    assert not torch.allclose(net(x, t, other)[0], net(x, t, y)[0], atol=1e-6)
    null = null_like(net, y)
    assert null.shape == (3, 6) and bool((null == PAD).all())
    assert torch.allclose(net(x, t, null)[2], net(x, t, y)[2], atol=1e-12)  # row 2 of y is the empty prompt


def test_the_spec_round_trips_and_bad_inputs_are_refused():
    net = tiny_mmdit(off_zero=True)
    rebuilt = build_model(model_spec(net)).double()
    rebuilt.load_state_dict(net.state_dict())
    x, t, y = inputs()
    assert torch.equal(rebuilt(x, t, y), net(x, t, y))
    with pytest.raises(ValueError, match="captions y"):
        net(x, t, torch.zeros(3, dtype=torch.long))  # class ids, not captions
    with pytest.raises(ValueError, match="L <= 6"):
        net(x, t, torch.zeros(3, 7, dtype=torch.long))


def test_the_objectives_and_samplers_take_captions_as_they_take_labels():
    """Base, reflow, consistency and sampling see a condition, not a class id: the MMDiT's captions pass
    through label dropout (to the empty prompt) and classifier-free guidance (against it) unchanged."""
    import copy

    from models.consistency import ConsistencyDistillation
    from models.objectives import FlowMatching, drop_conditions
    from models.samplers import sample_ode

    net = tiny_mmdit(off_zero=True).float()
    y = torch.tensor([[2, 3, 4, 0, 0, 0], [5, 6, 7, 8, 9, 10]] * 4)  # (8, 6)
    torch.manual_seed(0)
    dropped = drop_conditions(net, y, 0.5)
    kept = (dropped == y).all(1)
    assert kept.any() and (~kept).any() and bool((dropped[~kept] == PAD).all())  # whole rows become the empty prompt
    x_1 = torch.randn(8, 2, 8, 8)
    loss = FlowMatching(label_dropout=0.25).loss(net, {"x_1": x_1, "y": y}).loss
    loss.backward()
    assert torch.isfinite(loss) and net.text_encoder.embedding.weight.grad.abs().sum() > 0  # the encoder trains with it
    seen = []
    net.register_forward_hook(lambda m, args, out: seen.append(args[2].clone()))
    with torch.no_grad():
        out = sample_ode(net, torch.randn(8, 2, 8, 8), y, steps=2, guidance=2.0)
    assert torch.isfinite(out.x_1).all() and len(seen) == 2
    assert torch.equal(seen[0][:8], y) and bool((seen[0][8:] == PAD).all())  # CFG: the caption, then the empty prompt
    student = copy.deepcopy(net)
    consistency = ConsistencyDistillation(net, student, num_intervals=4, guidance=2.0, label_dropout=0.1)
    assert torch.isfinite(consistency.loss(student, {"x_1": x_1, "y": y}).loss)
