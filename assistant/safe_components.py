"""The Chatbot and Markdown that show chat text, made to send it through
``markup.no_remote_images`` (remote images as ``[image: alt]``).

Subclasses, not wrapped instances: Gradio rebuilds a component from its constructor
arguments (``block.__class__(**kwargs)``) whenever a handler returns ``gr.update(...)`` for
it, and from then on that session's values are postprocessed by the rebuilt one, so a
wrapper set on the first instance is lost after the first prop update.  ``is_template``
makes the page render them as Gradio's own ``chatbot`` and ``markdown`` (like
``gr.TextArea``).  Gradio writes a stub (``safe_components.pyi``, git-ignored) next to this
file the first time it is imported."""

from __future__ import annotations

import gradio as gr
from gradio.components.chatbot import TextMessage

from assistant.markup import no_remote_images


class SafeChatbot(gr.Chatbot):
    """gr.Chatbot whose text parts have their remote images replaced."""

    is_template = True

    def _postprocess_content(self, chat_message):
        out = super()._postprocess_content(chat_message)
        if isinstance(out, TextMessage):
            out.text = no_remote_images(out.text)
        return out


class SafeMarkdown(gr.Markdown):
    """gr.Markdown whose text has its remote images replaced."""

    is_template = True

    def postprocess(self, value):
        return super().postprocess(no_remote_images(value) if isinstance(value, str) else value)
