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

-- A part lease is "<holder>|<task id>|<deadline>": the worker incarnation (or prefork pool
-- process) sending the part, the task, and the unix time after which the lease is void even
-- though its holder lives (a task hung in a read or a socket must not hold its part for ever).
-- Returns the lease's owner ("<holder>|<task id>"), its holder, and its deadline (nil if none).
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
