"""Render a conversation and its prefixes exactly as tokenizer.apply_chat_template does, at less cost.

The fast path of SFTTemplate renders each conversation once in full and once per turn boundary (see
template.py); those renders are a large share of its time, so they are made cheaper here without
changing a character of the output:

- The conversation is prepared once with transformers' own functions, the ones apply_chat_template
  runs (None-valued keys dropped, plain JSON data, reasoning aliases). Each step maps every message on
  its own, so preparing the whole list and slicing it equals preparing each prefix.
- The chat template is compiled in an overlay of apply_chat_template's own Jinja environment (same
  sandbox, settings, extensions, filters and globals) whose attribute reads take two shortcuts, each
  returning what the sandbox returns (tests/data/sft/test_sft_template_fast_path.py compares both):
    - `message.role` on a plain dict: the sandbox first asks the dict for a Python attribute, which raises
      AttributeError, and only then reads the item. A plain dict has an attribute only if the `dict` type
      has it, so for any other name the item (or, when missing, the sandbox's undefined) is returned at once.
    - `loop.first`, `ns.system`: for a loop or a namespace, the sandbox's checks come down to the name not
      starting with "_" (see _GUARDED_TYPES), so an attribute holding plain data is returned at once.
  Everything else (methods, other objects, underscore names) goes through the sandbox unchanged.
- Template.render merges the template's globals (a ChainMap, slow to iterate) into a new dict on every
  call, and the new Context iterates them again for their names. Here the globals are copied into a plain
  dict once per batch; each render makes its context from that dict and the variables, the same context
  render makes (jinja2.runtime.new_context, which render calls, given the merged dict as is).

A render that raises is not explained here (render's traceback rewriting is skipped): the caller then
encodes the row the exact way, through apply_chat_template, which raises the real error.
"""
from __future__ import annotations

import types
from collections import abc, deque
from functools import lru_cache

try:  # the pieces apply_chat_template renders with (transformers.utils.chat_template_utils)
    from jinja2.runtime import LoopContext, new_context
    from jinja2.utils import Namespace
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers.utils import chat_template_utils as _hf_chat
    AVAILABLE = all(hasattr(_hf_chat, name) for name in (
        "_compile_jinja_template", "_normalize_chat_messages", "_plain_template_data", "_alias_reasoning_fields"))
except ImportError:  # another transformers or jinja2: the caller keeps the exact path
    _hf_chat, ImmutableSandboxedEnvironment, LoopContext, Namespace, AVAILABLE = None, object, None, None, False

_DICT_ATTRIBUTES = frozenset(dir(dict))  # every attribute a plain dict instance can have
_PLAIN_VALUES = (str, int, float, bool, type(None), list, dict, tuple)
# Types whose every attribute not starting with "_" the sandbox allows (jinja2.sandbox.is_safe_attribute): an
# object of none of these types is not "internal" (is_internal_attribute) and has no method that changes
# a known mutable (modifies_known_mutable), so only the leading underscore is checked.
_GUARDED_TYPES = (types.FunctionType, types.MethodType, type, types.CodeType, types.TracebackType,
                  types.FrameType, types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType,
                  abc.MutableSet, abc.MutableMapping, abc.MutableSequence, deque)


def _plain_attribute_types(environment) -> tuple[type, ...]:
    """The template-side objects whose attributes templates read most (loop, namespace), when the sandbox
    checks nothing but the name for them."""
    kinds = [LoopContext, Namespace]
    maker = environment.globals.get("namespace")
    if isinstance(maker, type) and issubclass(maker, Namespace):
        kinds.append(maker)  # transformers' namespace (a Namespace that refuses "_" names when set)
    return tuple(kind for kind in kinds if not issubclass(kind, _GUARDED_TYPES)
                 and kind.__getattribute__ in (object.__getattribute__, Namespace.__getattribute__))


class _ShortcutSandbox(ImmutableSandboxedEnvironment):
    """apply_chat_template's sandbox, with two shortcuts that return what the sandbox returns:
    - a plain dict's item (message.role) without first failing to find a Python attribute of that name;
    - an attribute of a loop or a namespace (loop.first, ns.system) that holds plain data, without the
      per-access checks that cannot refuse it (see _GUARDED_TYPES)."""

    plain_attribute_types: tuple[type, ...] = ()

    def getattr(self, obj, attribute):
        kind = type(obj)
        if kind is dict and attribute not in _DICT_ATTRIBUTES:
            try:
                return obj[attribute]  # what the sandbox returns after getattr(obj, attribute) failed
            except KeyError:
                return self.undefined(obj=obj, name=attribute)  # as the sandbox, for a missing item
        if kind in self.plain_attribute_types and not attribute.startswith("_"):
            try:
                value = getattr(obj, attribute)
            except AttributeError:
                pass  # the sandbox decides what a missing attribute gives
            else:
                if type(value) in _PLAIN_VALUES:  # not a str.format method, which the sandbox would wrap
                    return value
        return super().getattr(obj, attribute)


@lru_cache(maxsize=16)
def _compile(source: str):
    """The chat template compiled in an overlay of the environment apply_chat_template compiles it in, or
    apply_chat_template's own compiled template if that environment is not the expected sandbox."""
    template = _hf_chat._compile_jinja_template(source)
    if type(template.environment) is not ImmutableSandboxedEnvironment:
        return template
    environment = template.environment.overlay()  # shares settings, extensions, filters and globals
    environment.__class__ = _ShortcutSandbox
    environment.plain_attribute_types = _plain_attribute_types(environment)
    return environment.from_string(source)


class ChatRenderer:
    """Renders conversations for one batch: the template and its variables are looked up once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._by_tools: dict[bool, tuple] = {}
        # the variables apply_chat_template passes besides messages/tools/documents/add_generation_prompt
        self.variables = _hf_chat._plain_template_data(tokenizer.special_tokens_map)

    def _template(self, has_tools: bool):
        """(compiled template, its globals as a plain dict, the context's start): get_chat_template picks the template by
        whether tools are given (a tokenizer may hold a separate `tool_use` template)."""
        if has_tools not in self._by_tools:
            template = _compile(self.tokenizer.get_chat_template(None, [{}] if has_tools else None))
            template_globals = dict(template.globals)
            # the context's start: the globals, then apply_chat_template's variables over them
            self._by_tools[has_tools] = (template, template_globals, {**template_globals, **self.variables})
        return self._by_tools[has_tools]

    def prepare(self, messages: list[dict], tools: list[dict] | None) -> PreparedChat:
        tools = tools or None  # as SFTTemplate.render passes them
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise TypeError("tools given as callables: rendered the exact way")
        template, template_globals, known = self._template(tools is not None)
        chat = _hf_chat._alias_reasoning_fields(_hf_chat._plain_template_data(_hf_chat._normalize_chat_messages(messages)))
        return PreparedChat(template, template_globals, known, chat, _hf_chat._plain_template_data(tools))


class PreparedChat:
    """One conversation, prepared once, rendered at any prefix length."""

    __slots__ = ("template", "template_globals", "known", "chat", "tools")

    def __init__(self, template, template_globals: dict, known: dict, chat: list[dict], tools):
        self.template, self.template_globals, self.chat, self.tools = template, template_globals, chat, tools
        self.known = known

    def render(self, length: int, add_generation_prompt: bool) -> str:
        """apply_chat_template(messages[:length], tools, add_generation_prompt=...) as a string."""
        template = self.template
        variables = {**self.known, "messages": self.chat[:length], "tools": self.tools, "documents": None,
                     "add_generation_prompt": add_generation_prompt}
        context = new_context(template.environment, template.name, template.blocks, variables, True,
                              self.template_globals, None)
        return template.environment.concat(template.root_render_func(context))
