"""Serving: the OpenAI-compatible HTTP API (`tinyllm serve`) and the Streamlit chat page (`tinyllm web`)."""
