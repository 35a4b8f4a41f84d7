-- A notifier reports how an attempt to deliver an outbox event went.
-- KEYS[1] the outbox, KEYS[2] the event's hash. ARGV[1] the claim token, ARGV[2] now, ARGV[3] outcome:
-- "delivered", "retry" (due again at ARGV[6]) or "failed" (given up for good), ARGV[4] the last
-- status (an HTTP status, or ""), ARGV[5] the last error ("" if none), ARGV[6] next attempt,
-- ARGV[7] seconds to keep a settled event's hash.
-- A delivery is recorded whoever made it (the first one's time stands); a retry or a give-up
-- only by the attempt that holds the claim, so a notifier whose lease lapsed cannot push back an
-- event another one is delivering. Returns "ok", "fenced", or "missing".
if redis.call("EXISTS", KEYS[2]) == 0 then
  return "missing"
end
local id = string.sub(KEYS[2], string.len(KEYS[1]) + 2)
local outcome = ARGV[3]
if outcome == "delivered" then
  if redis.call("HGET", KEYS[2], "delivered_at") then
    return "ok"
  end
  redis.call("HSET", KEYS[2], "delivered_at", ARGV[2], "last_status", ARGV[4], "last_error", "", "next_attempt", "")
elseif redis.call("HGET", KEYS[2], "claim") ~= ARGV[1] or redis.call("HGET", KEYS[2], "delivered_at") then
  return "fenced"
elseif outcome == "retry" then
  redis.call("HSET", KEYS[2], "last_status", ARGV[4], "last_error", ARGV[5], "next_attempt", ARGV[6])
  redis.call("HDEL", KEYS[2], "claim", "claim_until")
  redis.call("ZADD", KEYS[1], tonumber(ARGV[6]), id)
  return "ok"
else
  redis.call("HSET", KEYS[2], "gave_up_at", ARGV[2], "last_status", ARGV[4], "last_error", ARGV[5], "next_attempt", "")
end
redis.call("HDEL", KEYS[2], "claim", "claim_until")
redis.call("ZREM", KEYS[1], id)
redis.call("EXPIRE", KEYS[2], tonumber(ARGV[7]))
return "ok"
