"""An OpenAI-compatible endpoint as the scorer sees it: where, which model name, which key."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, SecretStr


class Endpoint(BaseModel):
    model_config = ConfigDict(frozen=True)

    url: str  # base URL without /v1, e.g. http://127.0.0.1:8123
    model: str  # the served model name to put in requests
    api_key: SecretStr | None = None  # never printed: SecretStr renders as '**********'

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key.get_secret_value()}"} if self.api_key else {}
