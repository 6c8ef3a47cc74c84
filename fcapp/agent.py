"""The paper's agent: inject function descriptions and call examples into the prompt, let the model
make one call per step, execute it, feed the result (or a clear error) back, stop at an answer.

Every step is reported as an Event so the UI and the CLI can stream a chain live; a finished
chain is a Chain record holding every message, call, result, error, token count and timing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from fcapp.calls import CallParseError, ParsedCall, call_end, parse_call, scrub_surrogates
from fcapp.models.base import ChatModel, Message, SamplingParams
from fcapp.records import FINAL_ANSWER, Call, Chain, Event, Step
from fcapp.tools.base import Registry, Tool, ToolError, tool_from_function

SYSTEM_TEMPLATE = """You solve problems step by step by calling functions. Reply with exactly one function call and nothing else, written like this: name(argument="value")
Each call's result comes back to you. When you know the answer, call {final}.

Functions:
{functions}"""


def final_answer(answer: str) -> str:
    """Give the final answer to the problem and stop.

    Args:
        answer: the answer alone, e.g. a number or True / False / Unknown
    """
    return f"Final answer: {answer}"


@dataclass
class AgentConfig:
    max_steps: int = 10
    max_consecutive_errors: int = 3
    sampling: SamplingParams = field(default_factory=SamplingParams)


def render_functions(tools: Registry) -> str:
    """The functions block of the system prompt: signature, description, examples (the injection)."""
    blocks = []
    for t in tools:
        lines = [t.signature(), f"    {t.description}"]
        lines += [f"    Example: {t.render_call(example)}" for example in t.examples]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def demonstration(tools: Registry, question: str, calls: list[Call]) -> list[Message]:
    """A worked example as messages: the question, then each reference call and its real result.

    `tools` are the demo problem's own tools (FOL tools are bound to that problem's premises)."""
    replayer = Agent(tools)
    chain = replayer.start("demo", "demo", question, "reference")
    replayer.replay(chain, calls)
    return [{"role": "user", "content": question}, *chain.completion_messages()]


def with_final_answer(tools: Registry) -> Registry:
    """The task's tools plus the final_answer function every chain ends with."""
    combined = Registry(list(tools))
    if FINAL_ANSWER not in combined.names():
        combined.add(tool_from_function(final_answer, examples=[{"answer": "42"}]))
    return combined


class Agent:
    """Runs one problem through a model with a registry of tools."""

    def __init__(self, tools: Registry, demo: list[Message] | None = None, config: AgentConfig | None = None) -> None:
        """`demo`: worked-example messages placed before the question (see `demonstration`)."""
        self.tools = with_final_answer(tools)
        self.demo = list(demo or [])
        self.config = config or AgentConfig()

    # ---- prompt -------------------------------------------------------------------------------
    def system_prompt(self) -> str:
        return SYSTEM_TEMPLATE.format(final=FINAL_ANSWER, functions=render_functions(self.tools))

    def prompt(self, question: str) -> list[Message]:
        return [{"role": "system", "content": self.system_prompt()}, *self.demo, {"role": "user", "content": question}]

    def start(self, task: str, problem_id: str, question: str, model_id: str, seed: int = 0) -> Chain:
        sampling = asdict(self.config.sampling) | {"seed": seed}
        return Chain(task, problem_id, question, model_id, self.prompt(question), self.tools.schemas(), seed, sampling)

    # ---- one step -----------------------------------------------------------------------------
    def step_params(self, chain: Chain) -> SamplingParams:
        """Sampling for the next reply: the chain's settings, a per-step seed."""
        base = self.config.sampling
        return SamplingParams(base.temperature, base.top_p, base.max_new_tokens, chain.seed * 1000 + len(chain.steps), base.stop)

    def cut_reply(self, text: str) -> str:
        """The reply up to the end of its first call (anything after it is not acted on)."""
        end = call_end(text, self.tools.names())
        return (text[:end] if end is not None else text).strip()

    def execute(self, text: str) -> Step:
        """Parse one reply, validate and run its call, and return the Step (never raises)."""
        # a JSON "\ud800" escape from an HTTP model decodes to a lone surrogate, which UTF-8 (and so
        # the store) cannot hold
        text = scrub_surrogates(text)
        step = Step(index=0, text=text)
        try:
            parsed = parse_call(text, self.tools.names())
            tool = self.tools.lookup(parsed.name)
            arguments = self._name_positional(tool, parsed)
            step.call = Call(tool.name, arguments)
            began = time.perf_counter()
            try:
                step.result = tool.call(arguments)
            finally:
                step.tool_elapsed_s = time.perf_counter() - began
        except (CallParseError, ToolError) as exc:
            step.error = f"{exc}. {self._format_hint()}" if isinstance(exc, CallParseError) else str(exc)
        except Exception as exc:  # noqa: BLE001 - a bug or a case nobody foresaw still ends as a step, not a crash
            step.error = f"the call could not be carried out ({type(exc).__name__}: {str(exc)[:300]})"
        return step

    def advance(self, chain: Chain, reply: str, prompt_tokens: int = 0, completion_tokens: int = 0,
                elapsed_s: float = 0.0) -> list[Event]:
        """Apply one model reply to the chain; returns the events it produced."""
        step = self.execute(self.cut_reply(reply))
        step.index = len(chain.steps)
        step.prompt_tokens, step.completion_tokens, step.elapsed_s = prompt_tokens, completion_tokens, elapsed_s
        chain.steps.append(step)
        events: list[Event] = []
        if step.call is not None:
            events.append(Event("call", step.index, step.text, {"name": step.call.name, "arguments": step.call.arguments}))
        if step.error is not None:
            events.append(Event("error", step.index, step.error))
        elif step.call is not None and step.call.name == FINAL_ANSWER:
            chain.answer = str(step.call.arguments.get("answer", "")).strip()
            chain.stop_reason = "answer"
            events.append(Event("answer", step.index, chain.answer))
        else:
            events.append(Event("result", step.index, step.result or "", {"elapsed_s": step.tool_elapsed_s}))
        if not chain.done:
            recent = chain.steps[-self.config.max_consecutive_errors:]
            if len(recent) == self.config.max_consecutive_errors and all(s.error for s in recent):
                chain.stop_reason = "errors"
            elif len(chain.steps) >= self.config.max_steps:
                chain.stop_reason = "max_steps"
        if chain.done:
            chain.elapsed_s = time.time() - chain.started_at
        return events

    # ---- whole chains -------------------------------------------------------------------------
    def run(self, model: ChatModel, chain: Chain) -> Iterator[Event]:
        """Drive `chain` to its end with `model`, streaming events. Closing the iterator stops it."""
        names = self.tools.names()
        while not chain.done:
            index = len(chain.steps)
            yield Event("step", index)
            began = time.perf_counter()
            text, prompt_tokens, completion_tokens = "", 0, 0
            stream = model.stream(chain.messages(), chain.tools, self.step_params(chain))
            try:
                for chunk in stream:
                    prompt_tokens = chunk.prompt_tokens or prompt_tokens
                    completion_tokens = chunk.completion_tokens or completion_tokens
                    if chunk.text:
                        text += chunk.text
                        yield Event("token", index, chunk.text)
                    if chunk.finished or call_end(text, names) is not None:
                        break  # a finished call ends the reply: no tokens wasted after it
            finally:
                close = getattr(stream, "close", None)
                if close:
                    close()
            yield from self.advance(chain, text, prompt_tokens, completion_tokens, time.perf_counter() - began)
        yield Event("done", len(chain.steps) - 1, chain.answer or "", {"stop_reason": chain.stop_reason}, chain)

    def solve(self, model: ChatModel, chain: Chain) -> Chain:
        for _ in self.run(model, chain):
            pass
        return chain

    def replay_steps(self, calls: list[Call]) -> list[Step]:
        """Execute known calls (a reference chain) exactly as the model's calls would be."""
        steps = []
        for i, call in enumerate(calls):
            step = self.execute(self.tools.get(call.name).render_call(call.arguments))
            step.index = i
            steps.append(step)
        return steps

    def replay(self, chain: Chain, calls: list[Call]) -> Chain:
        """Fill `chain` with a reference chain's steps (marked reference, model_id 'reference')."""
        for step in self.replay_steps(calls):
            self.advance(chain, step.text)
            if chain.done:
                break
        chain.reference = True
        return chain

    # ---- helpers ------------------------------------------------------------------------------
    def _name_positional(self, tool: Tool, parsed: ParsedCall) -> dict[str, Any]:
        order = list(tool.parameters.get("properties", {}))
        if len(parsed.positional) > len(order):
            raise ToolError(f"{tool.name} takes at most {len(order)} argument(s); signature: {tool.signature()}")
        arguments = dict(zip(order, parsed.positional))
        for key, value in parsed.arguments.items():
            if key in arguments:
                raise ToolError(f"{tool.name} got argument {key!r} twice")
            arguments[key] = value
        return arguments

    def _format_hint(self) -> str:
        example = next((t for t in self.tools if t.examples), None)
        shown = example.render_call(example.examples[0]) if example else f'{FINAL_ANSWER}(answer="42")'
        return f"Reply with exactly one function call, for example: {shown}"
