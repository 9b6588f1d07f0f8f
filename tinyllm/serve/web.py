"""The Streamlit chat page: `tinyllm web`, or `streamlit run tinyllm/serve/web.py [-- --artifacts DIR]`.

Pick one of the pipeline's checkpoints, set a system prompt and sampling, chat with streamed
replies; the conversation (a ChatSession, the same engine as `tinyllm chat`) lives in the
browser session, and "Clear chat" starts over.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import streamlit as st

from tinyllm.errors import UserError
from tinyllm.infer.chat import ChatSession, load_chat_model
from tinyllm.train.checkpoint import is_checkpoint

STAGES = ("grpo", "dpo", "lora", "sft", "pretrain")
EMPTY = "_(the model ended its reply without any text)_"


def page_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--device", default="cpu")
    return parser.parse_args(sys.argv[1:])


@st.cache_resource(show_spinner="loading the model…")
def cached_model(checkpoint: str, device: str):
    return load_chat_model(Path(checkpoint), device=device)


def main() -> None:
    args = page_args()
    st.set_page_config(page_title="TinyLLM chat", page_icon="💬")
    st.title("TinyLLM chat")
    checkpoints = [str(args.artifacts / s) for s in STAGES if is_checkpoint(args.artifacts / s)]
    if not checkpoints:
        st.error(f"No checkpoint in {args.artifacts} ({', '.join(STAGES)}): run `dvc repro` first.")
        return
    with st.sidebar:
        checkpoint = st.selectbox("Checkpoint", checkpoints, help="the pipeline's stages, newest first")
        system = st.text_area("System prompt", value="", help="empty: none")
        temperature = st.slider("Temperature", 0.0, 1.5, 0.7, 0.05, help="0 is greedy")
        top_p = st.slider("Top-p", 0.05, 1.0, 0.9, 0.05)
        max_tokens = st.slider("Max tokens", 8, 512, 128, 8)
        clear = st.button("Clear chat")
    try:
        model, tok, _ = cached_model(checkpoint, args.device)
    except (UserError, FileNotFoundError) as err:
        st.error(str(err))
        return
    key = f"session:{checkpoint}"
    if key not in st.session_state or clear:
        st.session_state[key] = ChatSession(model, tok)
    session: ChatSession = st.session_state[key]
    session.system_prompt = system or None
    session.temperature, session.top_p, session.max_new_tokens = temperature, top_p, max_tokens

    for message in session.messages:
        with st.chat_message(message["role"]):
            st.markdown(message["content"] or EMPTY)
    if prompt := st.chat_input("Say something"):
        with st.chat_message("user"):
            st.markdown(prompt)
        dropped = session.dropped_turns
        with st.chat_message("assistant"):
            try:
                if not st.write_stream(session.send(prompt)):
                    st.markdown(EMPTY)
            except UserError as err:
                st.error(str(err))
        if session.dropped_turns > dropped:
            st.info(f"The oldest {session.dropped_turns - dropped} turn(s) no longer fit the context and were dropped.")


main()
