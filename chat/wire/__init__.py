"""The API's wire shapes: the JSON body read safely (body), requests validated by one pydantic definition
each (requests), answers built (responses), every error in the SPEC's envelope (errors)."""
