"""The MER task: prompts in both thinking modes, the rewards, and the field's metrics (OV, hit rate, WAF, MME)."""
