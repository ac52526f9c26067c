"""Config sections for multi-turn episodes: the environment, the user simulator, the judges, ``llm_judge``.

These sections are wired into ``RunConfig`` as ``environment``, ``user_simulator`` and ``judge``;
``LlmJudgeReward`` joins the ``rewards`` union. Like the rest of ``trainer.config`` this module
imports only pydantic: the launcher validates these sections without torch or litellm.

API keys never appear in a config: ``api_key_env`` names the environment variable that holds the
key, and an inline ``api_key`` is rejected with a message saying so (configs end up in checkpoints,
ConfigMaps and logs).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from trainer.config.api_keys import ENV_NAME, looks_like_key, variable_holding
from trainer.config.base import RewardBase, Section

_INLINE_KEY_NAMES = ("api_key", "apikey", "key", "token", "api_token")


class ApiBackendConfig(Section):
    """An LLM behind an OpenAI-compatible API (through litellm) or a Hugging Face model run in-process."""

    backend: Literal["api", "local"] = Field(
        "api",
        description="`api`: any OpenAI-compatible endpoint through litellm (`model`, `api_base`, `api_key_env`); "
        "`local`: a Hugging Face causal LM loaded in-process from `path`, so a run needs no API at all.",
    )
    model: str | None = Field(
        None,
        description="API backend: the model name the endpoint knows (e.g. `qwen-plus`); sent as `openai/<model>`. "
        "Required for `backend: api`.",
    )
    api_base: str | None = Field(
        None,
        description="API backend: base URL of the OpenAI-compatible endpoint, e.g. "
        "`https://dashscope.aliyuncs.com/compatible-mode/v1` or `https://<relay>/v1`. Unset: api.openai.com.",
    )
    api_key_env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="API backend: name of the environment variable holding the API key (e.g. `DASHSCOPE_API_KEY`). "
        "The key itself never goes in the config. Unset: no key is sent (local servers).",
    )
    extra_body: dict[str, Any] = Field(
        default_factory=dict,
        description="API backend: extra JSON fields merged into each request body, e.g. `{enable_thinking: false}` "
        "for DashScope Qwen3 models (they think by default and non-streaming calls then fail with 400).",
    )
    path: str | None = Field(
        None, description="Local backend: directory of a Hugging Face causal LM with a chat template."
    )
    temperature: float = Field(
        0.7, ge=0, description="Sampling temperature; 0 is greedy and makes calls cacheable."
    )
    max_tokens: int = Field(256, ge=1, description="Completion length limit per call.")
    timeout_s: float = Field(
        60.0,
        gt=0,
        description="Per-attempt request timeout in seconds (litellm's default is 6000 s: always bound it).",
    )
    retries: int = Field(
        4,
        ge=0,
        description="Retries after a failed attempt on 429, 5xx, timeouts, refused or dropped connections and "
        "malformed responses; exponential backoff with jitter, at least the server's Retry-After. 4xx other than "
        "429 are not retried. A call that still fails marks its episode invalid (never a zero reward).",
    )
    backoff_s: float = Field(
        1.0, gt=0, description="First retry delay in seconds; doubles per retry (with jitter)."
    )
    max_backoff_s: float = Field(30.0, gt=0, description="Cap of one retry delay, Retry-After included.")
    max_concurrency: int = Field(
        16,
        ge=1,
        description="Calls in flight at once to this backend. Extra calls wait in a queue; none is rejected.",
    )
    rpm: int | None = Field(
        None,
        ge=1,
        description="Requests per minute budget (token bucket, refilled per second to ramp up smoothly).",
    )
    tpm: int | None = Field(
        None,
        ge=1,
        description="Tokens per minute budget (prompt estimate + max_tokens reserved before a call, corrected by "
        "the reported usage after it).",
    )
    price_per_1k_prompt_tokens: float = Field(
        0.0, ge=0, description="Price of 1000 prompt tokens in your currency, for `api/cost` and `budget`."
    )
    price_per_1k_completion_tokens: float = Field(
        0.0,
        ge=0,
        description="Price of 1000 completion tokens in your currency, for `api/cost` and `budget`.",
    )
    budget: float | None = Field(
        None,
        gt=0,
        description="Stop the run gracefully, with a checkpoint, once this backend's cumulative cost passes this "
        "amount (needs the prices). Unset: no limit.",
    )
    cache: bool = Field(
        True,
        description="Cache deterministic calls (temperature 0) in `<output_dir>/api_cache.sqlite`, keyed by a hash "
        "of endpoint, model, messages and parameters, so a resumed run does not pay twice. Never holds the key.",
    )

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _a_name_not_a_key(cls, v: Any) -> Any:
        # Before the pattern check: its message would quote the value, which is often the key itself (a
        # `${DASHSCOPE_API_KEY}` in the file or a `$DASHSCOPE_API_KEY` the shell expanded). Never show it.
        if not isinstance(v, str) or (ENV_NAME.match(v) and not looks_like_key(v)):
            return v
        holder = variable_holding(v)
        ref = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", v.strip())
        name = holder or (ref.group(1) if ref else "DASHSCOPE_API_KEY")
        if holder:
            why = f"it is the value of ${holder} (not shown)"
        elif ref:
            why = f"{v.strip()} is a reference to the variable, not its name"
        elif looks_like_key(v):
            why = "the value looks like an API key (not shown)"
        else:
            why = "the value (not shown, in case it is a key) is not a variable name: letters, digits and '_'"
        raise ValueError(
            f"{why}; api_key_env wants the name of the environment variable that holds the key, e.g. "
            f"`api_key_env: {name}` after `export {name}=...` (the key never goes in the config: it is saved in "
            "checkpoints, ConfigMaps and logs)"
        )

    @model_validator(mode="before")
    @classmethod
    def _no_inline_key(cls, data: Any) -> Any:
        if isinstance(data, dict):
            inline = [k for k in data if str(k).lower() in _INLINE_KEY_NAMES]
            if inline:
                raise ValueError(
                    f"{inline[0]}: API keys must not be written in the config (it is saved in checkpoints and logs); "
                    "put the key in an environment variable and set api_key_env to its name, e.g. "
                    "api_key_env: DASHSCOPE_API_KEY"
                )
        return data

    @model_validator(mode="after")
    def _backend_fields(self) -> ApiBackendConfig:
        if self.backend == "api" and not self.model:
            raise ValueError(
                "backend is api but model is not set: give the endpoint's model name, e.g. model: qwen-plus"
            )
        if self.backend == "local" and not self.path:
            raise ValueError("backend is local but path is not set: give a Hugging Face model directory")
        if (
            self.budget is not None
            and self.price_per_1k_prompt_tokens == 0
            and self.price_per_1k_completion_tokens == 0
        ):
            raise ValueError(
                "budget is set but both prices are 0, so the cost never grows: set price_per_1k_prompt_tokens and "
                "price_per_1k_completion_tokens"
            )
        return self


class UserSimulatorConfig(ApiBackendConfig):
    """The LLM that plays the user."""

    max_invalid_rate: float = Field(
        0.2,
        ge=0,
        le=1,
        description="Stop the run (after saving a checkpoint) when more than this fraction of the episodes in the "
        "last `invalid_window` episodes were invalid (API failures, unparseable judge replies). The message names "
        "the endpoint and the errors seen.",
    )
    invalid_window: int = Field(
        256, ge=1, description="Episodes over which `max_invalid_rate` is measured (the newest ones)."
    )


class JudgeConfig(ApiBackendConfig):
    """The LLM that judges: IntentionGym's coverage judge (`environment.judge_backend: api`) and `llm_judge` rewards."""

    temperature: float = Field(
        0.0, ge=0, description="Sampling temperature; keep 0 so verdicts are reproducible and cached."
    )
    max_tokens: int = Field(
        128, ge=1, description="Completion length limit per call (verdicts are short JSON)."
    )


class EnvironmentConfig(Section):
    """The environment episodes run in."""

    name: Literal["single_turn", "intentiongym", "quiz", "tau2"] = Field(
        "single_turn",
        description="`single_turn`: one agent reply per prompt, scored by `rewards` (the foundation GRPO); "
        "`intentiongym`: the agent asks clarifying questions to a simulated user (UserRL's IntentionGym); "
        "`quiz`: the row's prompt is asked `max_turns` times, each reply scored 1 when it is the row's answer "
        "(deterministic, no API: a check that turn-level credit works); `tau2`: a customer-service agent calls a "
        "domain's tools for a simulated customer and is graded as tau2-bench grades it (`domain_dir`, `tools`).",
    )
    max_turns: int = Field(
        16,
        ge=1,
        description="Agent turns per episode at most (IntentionGym upstream: 16). `single_turn` uses 1.",
    )
    intentions: str | None = Field(
        None,
        description="IntentionGym: path of the intention JSON (`all_intentions_{train,test}.json`); rows of the "
        "Parquet data are matched to it by `reward_model.id`.",
    )
    val_intentions: str | None = Field(
        None, description="IntentionGym: intention JSON for the validation set; unset: `intentions` is used."
    )
    score: Literal["sum", "mean", "last"] = Field(
        "mean", description="Episode score from its turn rewards: `mean` (upstream), `sum`, or `last`."
    )
    judge_backend: Literal["api", "rule"] = Field(
        "api",
        description="IntentionGym coverage judge: `api` asks the `judge` LLM for strict JSON (an unparseable reply "
        "makes the episode invalid, never a zero reward); `rule` matches the question deterministically against "
        "each detail's description, inquiry and options (cheap; smoke tests and baselines).",
    )
    merged: bool = Field(
        False,
        description="IntentionGym: one `user_simulator` call per turn returns both the user's reply and the "
        "coverage judgement (half the round trips; verdicts are not cached and the reply is written by a model "
        "that also judges). Needs `judge_backend: api`; the `judge` section is then unused by the environment.",
    )
    rule_threshold: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Rule judge: fraction of a detail's inquiry keywords (or description keywords) a question must "
        "contain to cover it; naming one of its options also covers it.",
    )
    max_episode_tokens: int = Field(
        8192,
        ge=16,
        description="An episode whose token sequence (prompt, agent turns, observations) would grow past this "
        "ends there, scored on the turns taken so far; keep it within the model's context length.",
    )
    tool_name: str = Field(
        "interact_with_env", description="Name of the tool the agent calls to talk to the environment."
    )
    text_action: Literal["end", "ask"] = Field(
        "end",
        description="IntentionGym: what a reply without a tool call does. `end`: it ends the episode without "
        "scoring that turn (upstream: verl's tool-agent loop stops when the model answers in plain text). `ask`: "
        "the whole reply is the question, as if sent through the tool; for models that have not learned the tool "
        "format, such as the quickstart's tiny random-initialised one.",
    )
    # tau2: tool-using domains in tau2-bench's format (trainer/envs/tau2.py).
    domain_dir: str | None = Field(
        None,
        description="tau2: the domain folder, holding `db.json`, `policy.md`, `tasks.json` and `split_tasks.json` "
        "as tau2-bench ships them, e.g. `<tau2-bench>/data/tau2/domains/airline`; `builtin:bookshop` is userloop's "
        "own small domain. Rows name its tasks by `task_id` (`data.generate.task: tau2-tasks` writes them).",
    )
    tools: str | None = Field(
        None,
        description="tau2: `module:Class` of the domain's tools, a class built with the DB whose tool methods are "
        "marked as tau2's `@is_tool` marks them, e.g. `tau2.domains.airline.tools:AirlineTools` (tau2 installed) or "
        "`trainer.envs.domains.bookshop.tools:BookshopTools`.",
    )
    db_model: str | None = Field(
        None,
        description="tau2: `module:Class` of the pydantic model the DB file is validated into before the tools get "
        "it, as tau2's own tool classes need, e.g. `tau2.domains.airline.data_model:FlightDB`. Unset: the tools get "
        "the parsed JSON.",
    )
    task_split: str = Field(
        "train",
        description="tau2: the `split_tasks.json` split whose tasks `data.generate.task: tau2-tasks` writes into "
        "the training rows (`all`: every task).",
    )
    val_task_split: str = Field("test", description="tau2: the split of the validation rows.")
    user_guidelines: str | None = Field(
        None,
        description="tau2: a file with the user simulator's global guidelines, e.g. tau2-bench's "
        "`data/tau2/user_simulator/simulation_guidelines.md` for its exact wording. Unset: userloop's wording "
        "of the same rules and stop tokens.",
    )
    max_tool_errors: int = Field(
        10,
        ge=1,
        description="tau2: the episode ends, scored 0, once this many tool calls failed or did not parse "
        "(tau2's `max_errors`).",
    )
    nl_judge: bool = Field(
        False,
        description="tau2: grade each task's `nl_assertions` with the `judge` LLM and multiply the verdict into the "
        "reward also when NL_ASSERTION is not in the task's reward basis (tau2's `all_with_nl_assertions`); tasks "
        "whose basis lists it need this. A judge call that fails or a reply that does not parse makes the episode "
        "invalid.",
    )
    partial_reward: Literal["none", "first_call", "actions"] = Field(
        "none",
        description="tau2: a shaping reward added to tau2's 0/1 reward on the turn it is earned. `first_call`: 1 when "
        "the agent's first tool call is the tool of the task's first gold action (e.g. authenticating the customer "
        "first); `actions`: the fraction of gold actions the agent's tool calls match (tau2's ACTION check as "
        "partial credit). Times `partial_reward_weight`.",
    )
    partial_reward_weight: float = Field(1.0, ge=0, description="tau2: weight of `partial_reward`.")
    tool_shorthand: bool = Field(
        False,
        description="tau2: a plain-text reply that is a tool's name, or a prefix of only one tool's name (`f` for "
        "`find_user`), calls that tool without arguments, and the system prompt lists the tools by name instead "
        "of declaring their JSON schemas; for models that cannot write tool-call JSON yet, such as the "
        "quickstart's tiny random-initialised one.",
    )
    user_fault_checks: list[Literal["role_break", "goal_leak", "premature_stop"]] = Field(
        default_factory=lambda: ["role_break", "goal_leak", "premature_stop"],
        description="tau2: checks of every simulated-customer message. An episode whose simulator broke role, leaked "
        "its instructions or stopped before the task could be done (or said `###OUT-OF-SCOPE###`) is excluded from "
        "the loss and counted in `episodes/user_faults`, never scored 0. `[]` turns the checks off.",
    )

    @model_validator(mode="after")
    def _tau2(self) -> EnvironmentConfig:
        if self.name != "tau2":
            return self
        missing = [k for k in ("domain_dir", "tools") if not getattr(self, k)]
        if missing:
            raise ValueError(
                f"environment.name is tau2 but {' and '.join(missing)} not set: e.g. domain_dir: builtin:bookshop, "
                "tools: trainer.envs.domains.bookshop.tools:BookshopTools"
            )
        if "score" in self.model_fields_set and self.score != "sum":
            raise ValueError(
                f"environment.score is {self.score}, but a tau2 episode's score is the sum of its turn rewards (tau2's "
                "reward on the last turn, partial rewards where earned): set score: sum or leave it unset"
            )
        if self.score != "sum":  # resolved here so the logged config says what the run uses
            self.score = "sum"  # (only when it differs: assignment re-runs this validator)
        return self

    @model_validator(mode="after")
    def _consistent(self) -> EnvironmentConfig:
        if self.name == "intentiongym" and not self.intentions:
            raise ValueError(
                "environment.name is intentiongym but intentions is not set: give the intention JSON, e.g. "
                "intentions: data/intentiongym/all_intentions_train.json"
            )
        if self.merged and self.judge_backend != "api":
            raise ValueError(
                "merged: true asks the user simulator for the coverage judgement too, so it needs judge_backend: api "
                "(set merged: false to use the rule judge)"
            )
        return self


class LlmJudgeReward(RewardBase):
    """A reward from the `judge` LLM: a rubric prompt, a strict JSON score, normalised to `[0, 1]`."""

    type: Literal["llm_judge"]
    rubric: str = Field(
        description="What the judge scores and how. Placeholders: `{conversation}` (the episode transcript), "
        "`{prompt}` (the first user message), `{completion}` (the agent's last reply), `{answer}` (the row's "
        'answer, if any). The judge is told to reply with exactly `{"score": <number>}`.'
    )
    min_score: float = Field(0.0, description="Lowest score the rubric allows; maps to 0.")
    max_score: float = Field(10.0, description="Highest score the rubric allows; maps to 1.")

    @model_validator(mode="after")
    def _range(self) -> LlmJudgeReward:
        if self.max_score <= self.min_score:
            raise ValueError(
                f"max_score ({self.max_score}) must be greater than min_score ({self.min_score})"
            )
        return self
