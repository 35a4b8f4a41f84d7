-- Take ARGV[3] bytes' worth of tokens from the token bucket KEYS[1] (a hash: "tokens", "stamp",
-- and "drawn", the bytes taken since the bucket was made, for whoever measures the rate),
-- refilled at ARGV[1] bytes per second up to ARGV[2] bytes. The tokens are taken at once, even
-- into debt: the caller then sleeps the returned seconds (how long the bucket takes to pay the
-- debt back) before sending, so callers queue behind each other in the order they asked, and
-- the bytes leave at the rate however many workers ask. The bucket's clock is the Redis
-- server's (TIME), one for every worker whatever their own clocks say. The bucket expires ARGV[4]
-- seconds after its last use.
-- A part being paced is alive, however long the rate makes it: when KEYS[2] (the upload record)
-- and KEYS[3] (its in-flight leases) are given, the lease of part ARGV[5], if still the caller's
-- (owner ARGV[6]), is extended to at least ARGV[8] (the caller's now) plus the wait plus ARGV[7]
-- seconds, and the record's "throttled" is set to ARGV[8], so that neither the lease's time limit
-- nor the reconciler's stall rule takes the part for hung (see lease_holds, is_stalled).
-- A single PUT being paced is alive too: when KEYS[2] is given without KEYS[3], the record's
-- completion lease, if still the caller's (its "lease_token" is ARGV[6]) and the upload still
-- "completing", is extended the same way (ARGV[5] is unused), so that neither another completer
-- (begin_completion.lua) nor a resume (reopen_upload.lua) takes the PUT over while it is sent.
-- Returns the seconds to wait, as a string (Lua numbers become integers in replies).
local t = redis.call("TIME")
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, capacity, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local f = redis.call("HMGET", KEYS[1], "tokens", "stamp")
local tokens = tonumber(f[1]) or capacity
local stamp = tonumber(f[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - stamp) * rate) - amount
redis.call("HSET", KEYS[1], "tokens", string.format("%.3f", tokens), "stamp", string.format("%.6f", now))
redis.call("HINCRBY", KEYS[1], "drawn", amount)
redis.call("EXPIRE", KEYS[1], tonumber(ARGV[4]))
local wait = 0
if tokens < 0 then
  wait = -tokens / rate
end
if KEYS[3] then
  local lease = redis.call("HGET", KEYS[3], ARGV[5])
  if lease then
    local owner, _, deadline = parse_lease(lease)
    if owner == ARGV[6] and deadline then
      local until_ = math.max(deadline, tonumber(ARGV[8]) + wait + tonumber(ARGV[7]))
      redis.call("HSET", KEYS[3], ARGV[5], owner .. "|" .. string.format("%.3f", until_))
      if redis.call("HGET", KEYS[2], "state") == "uploading" then
        redis.call("HSET", KEYS[2], "throttled", ARGV[8])
      end
    end
  end
elseif KEYS[2] then
  local f = redis.call("HMGET", KEYS[2], "state", "lease_token", "lease_until")
  if f[1] == "completing" and f[2] == ARGV[6] then
    local until_ = math.max(tonumber(f[3] or "0"), tonumber(ARGV[8]) + wait + tonumber(ARGV[7]))
    redis.call("HSET", KEYS[2], "lease_until", string.format("%.3f", until_), "throttled", ARGV[8])
  end
end
return string.format("%.6f", wait)
