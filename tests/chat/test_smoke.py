import openai

from tests.conftest import Setup


def test_openai_sdk_chats_with_a_group(live, setup: Setup, upstream):
    client = openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)
    completion = client.chat.completions.create(model=setup.model, messages=[{"role": "user", "content": "Hi"}])
    assert completion.choices[0].message.content == "Hello from upstream."
    assert completion.model_extra["kitemesh"]["credits_charged"] == 1
    assert upstream.received[0].body["messages"][0] == {"role": "system", "content": "You are the acme brain."}
