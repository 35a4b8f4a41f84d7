-- Shared by the transition scripts: prepended to each one when it is loaded (a script sent with
-- EVAL cannot load another). Files whose name starts with "_" are not transitions themselves.

-- ARGV-form part number ``arg`` as a number if it is a part of the plan in record ``record_key``,
-- else nil; also the plan's part count. Only canonical integers 1..part_count count: "01" or
-- "1.0" would become a second parts-hash field for part 1, and a number outside the plan has no
-- byte range and must never count towards completion.
local function planned_part(arg, record_key)
  local number = tonumber(arg)
  local part_count = tonumber(redis.call("HGET", record_key, "part_count"))
  if not number or number % 1 ~= 0 or number < 1 or number > part_count or tostring(number) ~= arg then
    return nil, part_count
  end
  return number, part_count
end

-- When the next automatic resume of a transiently failed upload is due: ``first_wait`` doubled
-- for each of the ``made`` resumes already made, at most ``longest_wait`` after ``now``.
local function next_resume_at(now, made, first_wait, longest_wait)
  return now + math.min(tonumber(first_wait) * 2 ^ made, tonumber(longest_wait))
end

-- A part lease is "<holder>|<task>|<deadline>": the worker incarnation (or prefork pool
-- process) sending the part, the execution of the part task ("<task id>.<nonce>"), and the unix
-- time after which the lease is void even though its holder lives (a task hung in a read or a
-- socket must not hold its part for ever).
-- Returns the lease's owner ("<holder>|<task>"), its holder, and its deadline (nil if none).
local function parse_lease(value)
  local holder, task, deadline = string.match(value, "^([^|]*)|([^|]*)|?(.*)$")
  if not holder then
    return value, value, nil
  end
  return holder .. "|" .. task, holder, tonumber(deadline)
end

-- Whether lease ``value`` still holds at ``now``: its deadline has not passed and its holder's
-- heartbeat key (``worker_prefix .. holder``) exists.
local function lease_holds(value, worker_prefix, now)
  local _, holder, deadline = parse_lease(value)
  if deadline and deadline <= tonumber(now) then
    return false
  end
  return redis.call("EXISTS", worker_prefix .. holder) == 1
end

-- Recovery's index of the uploads that need its attention: ``active_key``, a sorted set of
-- upload ids scored by creation time. An upload belongs there while it is creating, uploading or
-- completing, or failed with an automatic resume to come ("retry_at" > 0); the reconciler reads
-- these only, never every record kept for the retention period. Every transition that can change
-- whether an upload belongs there ends with this call, in the same script, so the index never
-- disagrees with the records.
-- An upload that leaves (or is not in) the index while Celery chords of it are on record
-- ("<record key>:chords", see note_chord.lua) is put in ``settled_key`` (scored by ``now``): the
-- recovery leader then deletes those chords' keys from the result backend (take_settled.lua).
-- The upload id is the record key's last ":"-separated field (upload ids contain no ":").
-- Returns whether the upload needs attention.
local function track_attention(record_key, active_key, settled_key, now)
  local upload_id = string.match(record_key, "([^:]+)$")
  local f = redis.call("HMGET", record_key, "state", "retry_at", "created")
  local state = f[1]
  if state == "creating" or state == "uploading" or state == "completing"
      or (state == "failed" and (tonumber(f[2]) or 0) > 0) then
    redis.call("ZADD", active_key, tonumber(f[3]) or tonumber(now), upload_id)
    redis.call("ZREM", settled_key, upload_id)
    return true
  end
  redis.call("ZREM", active_key, upload_id)
  if redis.call("EXISTS", record_key .. ":chords") == 1 then
    redis.call("ZADD", settled_key, tonumber(now), upload_id)
  end
  return false
end

-- The outbox (see uploader/notify/): when an upload that asked to be notified reaches a terminal
-- state (``kind``: completed, failed for good, cancelled), one event per way it asked to be told
-- is written here, in the transition's own script, so an event exists exactly when the
-- transition happened: never lost, never doubled by a duplicate completion or a resume race
-- (callers only get here when their script changed the state).
-- An event is its id, ``<upload id>:<n>:<channel>`` (``n`` counts the upload's terminal
-- transitions: a failed upload resumed by hand may later complete), in ``outbox_key`` (a sorted
-- set scored by when the event is due), and a small hash ``<outbox_key>:<id>`` (upload id, kind,
-- channel, then its delivery state). The payload is built from the record at delivery time.
-- Channels: "webhook" (the record's callback_url) and "task" (on_complete for a completion,
-- on_failure for a failure or a cancellation). The record's "notified" lists the latest events.
-- Returns how many events were written.
local function append_outbox(record_key, outbox_key, kind, now)
  local f = redis.call("HMGET", record_key, "callback_url", "on_complete", "on_failure")
  local channels = {}
  if f[1] and f[1] ~= "" then
    table.insert(channels, "webhook")
  end
  local task = f[3]
  if kind == "completed" then
    task = f[2]
  end
  if task and task ~= "" then
    table.insert(channels, "task")
  end
  if #channels == 0 then
    return 0
  end
  local upload_id = string.match(record_key, "([^:]+)$")
  local n = redis.call("HINCRBY", record_key, "notify_seq", 1)
  local ids = {}
  for _, channel in ipairs(channels) do
    local id = upload_id .. ":" .. n .. ":" .. channel
    redis.call("HSET", outbox_key .. ":" .. id, "upload_id", upload_id, "kind", kind, "channel", channel,
      "created", now, "attempts", 0, "next_attempt", now)
    redis.call("ZADD", outbox_key, tonumber(now), id)
    table.insert(ids, id)
  end
  redis.call("HSET", record_key, "notified", table.concat(ids, " "))
  return #channels
end
