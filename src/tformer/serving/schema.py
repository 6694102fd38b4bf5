"""The bodies of `POST /translate`: the request pydantic checks, and the response it documents."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TranslateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sentences: list[str] = Field(description="the sentences to translate, one string each")
    # strict: pydantic would otherwise read true as 1 and "2" as 2, hiding a client's mistake
    beam: int | None = Field(
        None, ge=1, strict=True, description="beam size (1: greedy); default: the run's, at most the server's limit"
    )
    nbest: int | None = Field(None, ge=1, strict=True, description="translations returned per sentence (at most beam)")
    max_length: int | None = Field(None, ge=1, strict=True, description="at most this many output tokens per sentence")


class Candidate(BaseModel):
    text: str
    score: float


class SentenceTranslation(BaseModel):
    text: str = Field(description="the best translation")
    score: float = Field(description="its score: log-probability over the length penalty")
    nbest: list[Candidate] = Field(description="the n best, best first (the first is `text`)")


class TranslateResponse(BaseModel):
    translations: list[SentenceTranslation]
