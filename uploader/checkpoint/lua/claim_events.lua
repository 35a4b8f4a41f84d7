-- A notifier claims the outbox events that are due (see append_outbox in _shared.lua): each one
-- claimed is pushed ``lease`` seconds into the future in the outbox and counts one more attempt,
-- so a notifier killed while delivering leaves it to be claimed again once the lease lapses
-- (delivered at least once), and two notifiers never deliver the same event at the same time.
-- KEYS[1] the outbox. ARGV[1] now, ARGV[2] lease seconds, ARGV[3] the most events to claim,
-- ARGV[4] the claim token (settle_event.lua checks it).
-- Returns a flat list: event id, upload id, kind, channel, attempt number, for each event claimed.
local now = tonumber(ARGV[1])
local due = redis.call("ZRANGEBYSCORE", KEYS[1], "-inf", now, "LIMIT", 0, tonumber(ARGV[3]))
local out = {}
for _, id in ipairs(due) do
  local key = KEYS[1] .. ":" .. id
  local f = redis.call("HMGET", key, "upload_id", "kind", "channel")
  if not f[1] then
    redis.call("ZREM", KEYS[1], id)  -- its hash is gone (deleted by hand): nothing to deliver
  else
    local until_at = now + tonumber(ARGV[2])
    local attempt = redis.call("HINCRBY", key, "attempts", 1)
    redis.call("HSET", key, "claim", ARGV[4], "claim_until", until_at, "next_attempt", until_at)
    redis.call("ZADD", KEYS[1], until_at, id)
    table.insert(out, id)
    table.insert(out, f[1])
    table.insert(out, f[2])
    table.insert(out, f[3])
    table.insert(out, attempt)
  end
end
return out
