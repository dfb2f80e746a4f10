"""HTTP server over the engine: `app.py MODEL_DIR --serve [HOST:]PORT [--shared_secret S]`.

basilisk-compatible (server.basilisk has the field-by-field meaning):
    GET  /basilisk/ping       -> "pong"
    GET  /basilisk/config     -> the server's settings, without paths or secrets, plus model, ctx, vocab_size
    POST /basilisk/tokenize   {prompt, special_convert} -> {tokens, fragments}
    POST /basilisk/infer      {prompt, temperature, top_k, top_p, min_p, min_length, max_new_tokens,
                               stopping_strings, repetition_penalty(_sustain, _decay), positional_repeat_inhibit,
                               positional_repetition_penalty, special_convert} -> {text, tokens}
    POST /basilisk/embed      -> 501 (no embedding model can be configured)
OpenAI-compatible (any `model` name is accepted; responses name the model directory):
    GET  /v1/models, GET /v1/models/{id}
    POST /v1/completions, POST /v1/chat/completions (the model's chat format), `stream: true` as SSE;
         max_tokens, temperature, top_p, n, stop, seed, presence/frequency_penalty, logit_bias, and the
         extensions top_k, min_p, repetition_penalty, mirostat, mirostat_tau, mirostat_eta.
Errors: 400 with one clear line (OpenAI's error shape under /v1, text under /basilisk) for malformed JSON,
a wrong field type, a prompt that fills the context, or max_tokens beyond the room left. With a shared
secret: basilisk requests must send it as the raw Authorization header (else 403); /v1 requests as
`Bearer <secret>` (none: 401, wrong: 403). Requests share the engine first come, first served; a client
that disconnects stops its generation at the next token.
"""
