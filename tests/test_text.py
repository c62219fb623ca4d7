import torch

from text import CLS, PAD, SEP, UNK, CausalLM, LMConfig, TextConfig, TextEncoder, Tokenizer

CAPTIONS = ["a small red circle in the top left", "a large blue square on the right",
            "there is a green triangle at the bottom", "an orange cross in the center"]


def test_tokenizer_round_trip_padding_and_truncation():
    tok = Tokenizer.build(CAPTIONS, context_length=8)
    assert tok.decode(tok.encode("A small, RED circle!")) == "a small red circle"
    ids = tok(["a red circle", "a small red circle in the top left corner"])
    assert ids.shape == (2, 8)
    assert ids[0].tolist()[:5] == [CLS, tok.stoi["a"], tok.stoi["red"], tok.stoi["circle"], SEP]
    assert ids[0, 5:].eq(PAD).all()
    assert ids[1, -1] == SEP and ids[1, 0] == CLS  # truncated, [SEP] kept last
    assert tok.encode("a zebra")[2] == UNK
    again = Tokenizer.from_state_dict(tok.state_dict())
    assert again.itos == tok.itos and torch.equal(again(CAPTIONS), tok(CAPTIONS))


def test_text_encoder_ignores_padding():
    tok = Tokenizer.build(CAPTIONS, context_length=16)
    enc = TextEncoder(TextConfig(vocab_size=len(tok), context_length=16, width=32, depth=2, heads=2)).eval()
    short, long = tok(CAPTIONS, context_length=12), tok(CAPTIONS, context_length=16)
    torch.testing.assert_close(enc(short), enc(long), atol=1e-5, rtol=1e-5)


def greedy_by_hand(lm, ids, n):
    out = []
    for _ in range(n):
        nxt = lm(ids)[:, -1].argmax(-1)
        out.append(nxt.item())
        if out[-1] == SEP:
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
    return out


def test_lm_overfits_captions_and_generates_them():
    torch.manual_seed(0)
    tok = Tokenizer.build(CAPTIONS, context_length=16)
    lm = CausalLM(LMConfig(vocab_size=len(tok), context_length=16, width=64, depth=2, heads=2))
    ids = tok(CAPTIONS)
    opt = torch.optim.AdamW(lm.parameters(), lr=3e-3)
    for _ in range(150):
        loss = lm.loss(ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # the first word after [CLS] is ambiguous: the rest is memorised
    lm.eval()
    for cap, row in zip(CAPTIONS, ids):
        prompt = row[:3][None]  # [CLS] and the first two words pick the caption
        for beams in (1, 3):
            new = lm.generate(prompt, max_new_tokens=12, num_beams=beams)[0]
            assert tok.decode(prompt[0].tolist()[1:] + new) == cap
    prompt = ids[:1, :2]
    assert lm.generate(prompt, max_new_tokens=12)[0] == greedy_by_hand(lm, prompt, 12)


def test_lm_prefix_positions_get_no_loss():
    torch.manual_seed(0)
    lm = CausalLM(LMConfig(vocab_size=20, context_length=16, width=32, depth=1, heads=2))
    ids = torch.tensor([[CLS, 7, 8, SEP, PAD]])
    prefix = torch.randn(1, 3, 32, requires_grad=True)
    loss = lm.loss(ids, prefix)
    logits = lm(ids, prefix)[0, 3:7]  # predictions of 7, 8, SEP, PAD from the text positions
    ref = torch.nn.functional.cross_entropy(logits[:3], torch.tensor([7, 8, SEP]))
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert prefix.grad.abs().sum() > 0  # the soft prompt is trained through the text's loss
