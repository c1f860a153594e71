"""The tokenizer side both model engines share: chat-template rendering, /tokenize and /detokenize with a Hugging
Face tokenizer (the transformers engine's own, or the one vLLM loads)."""

from __future__ import annotations

from typing import Any

import jinja2

from deployments.engines.protocol import TokenizeRequest, TokenizeResult, TokenizingEngine, check_token_ids
from deployments.errors import InvalidRequestError
from models.spec import ModelSpec

__all__ = ["HFTokenizerMixin"]


class HFTokenizerMixin(TokenizingEngine):
    """`TokenizingEngine` for an engine that holds a Hugging Face tokenizer; the engine sets the attributes below
    when it starts."""

    spec: ModelSpec
    _tokenizer: Any
    _context_length: int
    _vocab_size: int

    def _render_chat(
        self, messages: tuple[Any, ...], tools: tuple[Any, ...], *, add_generation_prompt: bool
    ) -> list[int]:
        """Token ids of chat messages rendered with the model's chat template.

        Raises:
            InvalidRequestError: the model has no chat template, or the template rejects the messages.
        """
        if not self._tokenizer.chat_template:
            raise InvalidRequestError(
                f"model '{self.spec.id}' has no chat template; use the completions endpoint", param="messages"
            )
        turns = [message.template_dict() for message in messages]
        # As vLLM's server does: tools go to the template even with tool_choice 'none'.
        extra = {"tools": [tool.template_dict() for tool in tools]} if tools else {}
        try:
            ids = self._tokenizer.apply_chat_template(
                turns, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **extra
            )
        except (jinja2.TemplateError, TypeError) as exc:  # TypeError: the template joins text with a missing field
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}", param="messages") from exc
        return list(ids)

    async def tokenize(self, request: TokenizeRequest) -> TokenizeResult:
        """Token ids of a prompt or chat messages, as `generate` would see them; see `TokenizingEngine`.

        Raises:
            InvalidRequestError: no chat template, or the template rejects the messages.
        """
        if request.messages is not None:
            generation_prompt = request.add_generation_prompt
            ids = self._render_chat(request.messages, request.tools, add_generation_prompt=generation_prompt)
        else:
            ids = list(self._tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        strs = tuple(self._tokenizer.convert_ids_to_tokens(ids)) if request.return_token_strs else None
        return TokenizeResult(tokens=tuple(ids), token_strs=strs, max_model_len=self._context_length)

    async def detokenize(self, tokens: tuple[int, ...]) -> str:
        """The text of token ids; see `TokenizingEngine`.

        Raises:
            InvalidRequestError: an id is outside the vocabulary.
        """
        check_token_ids(tokens, self._vocab_size, "tokens")
        return str(self._tokenizer.decode(list(tokens)))
