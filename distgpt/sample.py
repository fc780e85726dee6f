"""Text generation from a GPT2 model: temperature and top-k sampling, one token at a time.

There is no KV cache: each new token reruns the forward over the (at most T) tokens of
context, using the model's planned activation buffers at a smaller (1, t) shape."""
import torch


def generate(model, prompt_tokens, max_new_tokens, temperature=1.0, top_k=0, seed=0, on_token=None):
    """Returns prompt + generated tokens. temperature 0 is greedy; top_k 0 keeps every token.
    on_token(token) is called for each new token as it is made (for streaming)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt_tokens)
    if not tokens:
        raise ValueError("the prompt must hold at least one token")
    T = model.acts.T
    for _ in range(max_new_tokens):
        context = tokens[-T:]
        x = torch.tensor([context], dtype=torch.long, device=model.device)
        model.forward(x)
        logits = model.logits[0, len(context) - 1, :model.vocab_size].float().cpu()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                cutoff = torch.topk(logits, top_k).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    return tokens


def sample_from_checkpoint(path, prompt, max_new_tokens, temperature, top_k, seed):
    """`distgpt sample`: load a checkpoint (or a run directory's latest) and stream text."""
    import sys

    from distgpt import checkpoint
    from distgpt.data.tokenizer import EOT_TOKEN, decode, encode

    model = checkpoint.inference_model(path, batch=1)
    prompt_tokens = [EOT_TOKEN] + encode(prompt)
    printed, made = "", []

    def stream(token):
        nonlocal printed
        made.append(token)
        text = decode(made)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    sys.stdout.write(prompt)
    generate(model, prompt_tokens, max_new_tokens, temperature, top_k, seed, on_token=stream)
    sys.stdout.write("\n")
