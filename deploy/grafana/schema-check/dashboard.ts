// The type a gd2po Grafana dashboard must satisfy: Grafana's own schema (@grafana/schema, pinned in
// package.json to the Grafana version docker-compose.yml runs), narrowed where Grafana's types are loose,
// so that `tsc --strict` on a dashboard embedded as a typed literal rejects any key Grafana does not know.
// tests/unit/test_deploy_grafana_schema.py embeds every deploy/grafana/dashboards/*.json as
// `const dashboard: GD2PODashboard = <json>` and type-checks it.
import type { Dashboard, DataQuery, Panel, RowPanel } from '@grafana/schema';
import type * as BarGauge from '@grafana/schema/dist/esm/raw/composable/bargauge/panelcfg/x/BarGaugePanelCfg_types.gen';
import type * as Heatmap from '@grafana/schema/dist/esm/raw/composable/heatmap/panelcfg/x/HeatmapPanelCfg_types.gen';
import type * as StatusHistory from '@grafana/schema/dist/esm/raw/composable/statushistory/panelcfg/x/StatusHistoryPanelCfg_types.gen';
import type * as TimeSeries from '@grafana/schema/dist/esm/raw/composable/timeseries/panelcfg/x/TimeSeriesPanelCfg_types.gen';

// Dashboard JSON holds an enum's values, not TypeScript enum members: map every string enum to the
// union of its values, recursively. Object types stay exact, so unknown keys are still excess properties.
// With Sparse = true every key becomes optional: panel options are saved sparsely (Grafana fills its
// defaults), but a key must still exist in the panel plugin's options schema.
type Json<T, Sparse extends boolean = false> = T extends string
  ? string extends T ? string : `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends Array<infer U>
      ? Array<Json<U, Sparse>>
      : T extends object
        ? Sparse extends true
          ? { [K in keyof T]?: Json<T[K], Sparse> }
          : { [K in keyof T]: Json<T[K], Sparse> }
        : T;

// Grafana types a panel's targets as Record<string, unknown>; every gd2po panel queries Prometheus, whose
// query kind (PrometheusDataQuery, Grafana 11; not published as an npm package) has these fields.
interface PrometheusQuery extends DataQuery {
  expr: string;
  editorMode?: 'code' | 'builder';
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  instant?: boolean;
  interval?: string;
  intervalFactor?: number;
  legendFormat?: string;
  range?: boolean;
}

// Panel.options is Record<string, unknown> in Grafana's dashboard schema; the panel plugins' own schemas
// (composable panelcfg kinds) type it. A dashboard that adds a panel type adds it here.
type PanelOf<Type extends string, Options> = Omit<Panel, 'type' | 'options' | 'targets'> & {
  type: Type;
  options?: Json<Options, true>;
  targets?: PrometheusQuery[];
};
type GD2POPanel =
  | PanelOf<'timeseries', TimeSeries.Options>
  | PanelOf<'heatmap', Heatmap.Options>
  | PanelOf<'bargauge', BarGauge.Options>
  | PanelOf<'status-history', StatusHistory.Options>;
type GD2PORow = Omit<RowPanel, 'panels'> & { panels: GD2POPanel[] };

export type GD2PODashboard = Json<Omit<Dashboard, 'panels'> & { panels?: Array<GD2POPanel | GD2PORow> }>;
