"""The aiohttp signaling server: rooms, tokens, WebSocket relay, pages, review API."""
